"""Generators a site trains on its own data and ships once, and the artifact contract they share.

- :mod:`synthlearn.generators.artifact`: the artifact every generator ships (safetensors weights, a manifest with
  the SHA-256 of every file, verified before anything is loaded);
- :mod:`synthlearn.generators.ldm`: CATphishing's 3D latent diffusion generator (config, data, stages, train,
  sample, and the memorising positive control of the privacy audit).
"""
