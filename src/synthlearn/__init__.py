"""synthlearn: share generators, not patients.

Multi-site medical-imaging studies in which hospitals (sites) never share raw images: every collaboration
strategy of CATphishing, FedAvg, FedGAN, AsynDGAN and Ren et al.'s federated distillation on one data
contract and one evaluation.
"""

__version__ = "0.1.0"
