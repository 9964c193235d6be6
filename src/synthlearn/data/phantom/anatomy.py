"""Subject anatomy: a random affine + smooth elastic warp of the PV atlas (PHANTOM.md, recipe steps 2 and 4).

A subject lives on the atlas grid ("output space", mm). Its sampling map sends each output point ``x`` to the
atlas point it shows::

    x1 = c + (x - c) * (1 - m * exp(-(|x - c| / (1.5 r))^2))        # tumour mass effect (if any)
    y  = o + M (x1 - o) + t + u(x)                                   # subject affine + elastic field

with ``o`` the brain centre, ``M`` a small rotation/shear/scale (and an optional L/R flip, free because the
template is symmetric), ``t`` a shift and ``u`` a smooth field (coarse 5^3 Gaussian noise, upsampled). One
``grid_sample`` then pulls all PV channels at once; they are renormalised to sum to 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.data.phantom.atlas import Atlas


def smooth_noise(gen: torch.Generator, channels: int, coarse: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Smooth random field: ``coarse^3`` standard normal nodes, trilinearly upsampled.

    Returns:
        ``(channels, X, Y, Z)`` float32.
    """
    nodes = torch.randn((1, channels, coarse, coarse, coarse), generator=gen)
    return F.interpolate(nodes, size=shape, mode="trilinear", align_corners=True)[0]


def voxel_coords_mm(affine: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """``(3, X, Y, Z)`` float32 world coordinates (mm) of voxel centres for a diagonal ``affine``."""
    axes = [torch.arange(n, dtype=torch.float32) * float(affine[i, i]) + float(affine[i, 3])
            for i, n in enumerate(shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@dataclasses.dataclass(frozen=True)
class SubjectTransform:
    """Output-space -> atlas-space map of one subject (without the tumour's mass effect).

    Attributes:
        matrix: ``(3, 3)`` linear part ``M`` (rotation, shear, scale, flip).
        shift: ``(3,)`` translation ``t`` in mm.
        origin: ``(3,)`` brain centre ``o`` in mm (the fixed point of ``M``).
        elastic: ``(3, X, Y, Z)`` float32 displacement ``u`` in mm on the output grid.
    """

    matrix: np.ndarray
    shift: np.ndarray
    origin: np.ndarray
    elastic: torch.Tensor

    def to_atlas(self, point_mm: np.ndarray) -> np.ndarray:
        """Atlas position of an output point (elastic part ignored: it is small and smooth)."""
        return self.origin + self.matrix @ (np.asarray(point_mm) - self.origin) + self.shift

    def from_atlas(self, point_mm: np.ndarray) -> np.ndarray:
        """Output position of an atlas point (inverse of :meth:`to_atlas`)."""
        return self.origin + np.linalg.solve(self.matrix, np.asarray(point_mm) - self.origin - self.shift)


def random_subject_transform(
    atlas: Atlas,
    rng: np.random.Generator,
    gen: torch.Generator,
    *,
    scale: float = 0.04,
    shear: float = 0.04,
    rotation_deg: float = 4.0,
    shift_mm: float = 4.0,
    elastic_mm: float = 2.5,
    flip: bool = True,
) -> SubjectTransform:
    """Draw a subject's anatomy transform.

    Args:
        atlas: the atlas (grid and brain centre).
        rng: draws the affine parameters.
        gen: draws the elastic field.
        scale: per-axis scale is ``1 + U(-scale, scale)``.
        shear: off-diagonal terms ``U(-shear, shear)``.
        rotation_deg: rotation angles ``U(-rotation_deg, rotation_deg)`` about each axis.
        shift_mm: translation ``U(-shift_mm, shift_mm)`` per axis.
        elastic_mm: standard deviation (mm) of the coarse displacement nodes.
        flip: mirror left/right with probability 0.5.

    Returns:
        The :class:`SubjectTransform`.
    """
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
           @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    shear_m = np.eye(3) + np.triu(rng.uniform(-shear, shear, (3, 3)), 1)
    scale_m = np.diag(1 + rng.uniform(-scale, scale, 3))
    flip_m = np.diag([-1.0 if (flip and rng.random() < 0.5) else 1.0, 1.0, 1.0])
    matrix = rot @ shear_m @ scale_m @ flip_m
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    brain = atlas.pv[0] < 0.5
    idx = np.argwhere(brain)
    centre_idx = (idx.min(0) + idx.max(0)) / 2
    origin = np.diag(atlas.affine)[:3] * centre_idx + atlas.affine[:3, 3]
    elastic = smooth_noise(gen, 3, 5, atlas.shape) * float(elastic_mm)
    return SubjectTransform(matrix=matrix, shift=shift, origin=origin, elastic=elastic)


def warp_atlas(
    atlas: Atlas,
    transform: SubjectTransform,
    coords_mm: torch.Tensor,
    mass_centre_mm: np.ndarray | None = None,
    mass_radius_mm: float = 0.0,
    mass_strength: float = 0.0,
) -> torch.Tensor:
    """Resample the atlas PV channels into a subject, with an optional radial mass effect.

    Args:
        atlas: the PV atlas.
        transform: the subject's output -> atlas map.
        coords_mm: ``(3, X, Y, Z)`` output voxel coordinates (mm), see :func:`voxel_coords_mm`.
        mass_centre_mm: ``(3,)`` tumour centre ``c`` in output space, or None for no mass effect.
        mass_radius_mm: tumour radius ``r`` (mm).
        mass_strength: ``m`` in ``[0, 1)``; tissue within ~1.5 r is pushed away from ``c``.

    Returns:
        ``(4, X, Y, Z)`` float32 PV fractions in :data:`~synthlearn.data.phantom.atlas.ATLAS_CHANNELS`
        order, summing to 1.
    """
    x = coords_mm
    if mass_centre_mm is not None and mass_strength > 0:
        c = torch.as_tensor(np.asarray(mass_centre_mm), dtype=torch.float32).view(3, 1, 1, 1)
        d = x - c
        dist2 = (d * d).sum(0, keepdim=True)
        x = c + d * (1 - mass_strength * torch.exp(-dist2 / (1.5 * mass_radius_mm) ** 2))
    o = torch.as_tensor(transform.origin, dtype=torch.float32).view(3, 1, 1, 1)
    m = torch.as_tensor(transform.matrix, dtype=torch.float32)
    y = torch.einsum("ij,jxyz->ixyz", m, x - o) + o
    y = y + torch.as_tensor(transform.shift, dtype=torch.float32).view(3, 1, 1, 1) + transform.elastic
    # atlas mm -> normalised [-1, 1] grid coordinates (align_corners=True); grid_sample wants (z, y, x) order
    shape = atlas.shape
    norm = []
    for i in range(3):
        idx = (y[i] - float(atlas.affine[i, 3])) / float(atlas.affine[i, i])
        norm.append(idx * (2.0 / (shape[i] - 1)) - 1.0)
    grid = torch.stack(norm[::-1], dim=-1)[None]
    pv = torch.from_numpy(atlas.pv)[None]
    # border padding: the atlas border is pure background, so points outside the cube read background
    out = F.grid_sample(pv, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    out = out.clamp_min(0)
    return out / out.sum(0, keepdim=True).clamp_min(1e-6)
