"""CATphishing's generator (paper 000): a KL autoencoder of four sequences and the tumour mask, an optional
super-resolution stage and a class-conditional 3D latent diffusion model.

- :mod:`~synthlearn.generators.ldm.config`: :class:`GeneratorConfig` (TOML, recorded in the manifest);
- :mod:`~synthlearn.generators.ldm.data`: a site's cases in the generator's working form;
- :mod:`~synthlearn.generators.ldm.stages`: the three training stages;
- :mod:`~synthlearn.generators.ldm.train`: ``train_generator`` (runs at a site, writes the artifact);
- :mod:`~synthlearn.generators.ldm.sample`: loading a verified artifact, the sampling loop and ``synthesize``
  (runs at the server);
- :mod:`~synthlearn.generators.ldm.memorising`: the deliberately over-fitted generator of the privacy audit.
"""
