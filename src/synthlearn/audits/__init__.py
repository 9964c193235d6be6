"""Audits of synthetic data, for any arm that ends in a synthetic dataset (CATphishing, AsynDGAN, FedGAN).

Each takes a synthetic site folder (or its cases) and real members and non-members, and never a strategy:

- :mod:`~synthlearn.audits.fidelity`: Frechet distances per sequence, same site and across sites;
- :mod:`~synthlearn.audits.quality`: BRISQUE and PIQE, real vs synthetic;
- :mod:`~synthlearn.audits.privacy`: SSIM membership inference with its negative, positive and reference
  controls, and the copy rate;
- :mod:`~synthlearn.audits.recognition`: how a real-trained model reads the synthetic cases' classes.
"""
