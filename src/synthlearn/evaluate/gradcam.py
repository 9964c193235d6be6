"""Grad-CAM maps of a multi-task model's classification heads (Ren et al. show them for every marker).

:func:`head_gradcam` runs MONAI's ``GradCAM`` (Selvaraju et al. 2017) on one head of a
:class:`synthlearn.models.multitask.MultiTaskUNet`: the head's logit of its predicted class, back-propagated to the
last layer the head reads (the voxel heads' trunk; the bottleneck for the pooled heads), weighted by the spatially
averaged gradients, ReLU, upsampled to the input grid and normalised to [0, 1] per case.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _Head(nn.Module):
    """A multi-task network seen as a classifier of one head: ``(B, C, *S)`` -> ``(B, K_h)`` logits."""

    def __init__(self, net: nn.Module, head: int):
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_all(x)[1][self.head]


def head_layer(net: nn.Module) -> str:
    """The layer Grad-CAM reads for ``net``'s heads: the voxel heads' trunk, else the deepest encoder level."""
    if getattr(net, "voxel_heads", False):
        return f"net.branch.{len(net.branch) - 1}"
    return f"net.encoder.{len(net.encoder) - 1}"


def head_gradcam(net: nn.Module, images: np.ndarray, head: int) -> np.ndarray:
    """Grad-CAM of head ``head`` for each case of ``images``.

    Args:
        net: a multi-task network (``forward_all``).
        images: ``(N, C, *S)`` preprocessed cases.
        head: the head's index.

    Returns:
        ``(N, *S)`` float32 maps in [0, 1].
    """
    from monai.visualize import GradCAM

    if head < 0 or head >= len(getattr(net, "heads", ())):
        raise ValueError(f"head {head} out of range for a network of {len(getattr(net, 'heads', ()))} heads")
    was_training = net.training
    net.eval()
    cam = GradCAM(nn_module=_Head(net, head), target_layers=head_layer(net))
    maps = []
    for i in range(images.shape[0]):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + 1], dtype=np.float32))
        maps.append(cam(x=x).detach().cpu().numpy()[0, 0])
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return np.stack(maps).astype(np.float32)


__all__ = ["head_gradcam", "head_layer"]
