"""Preprocessing as in CATphishing: crop to the brain, z-score each sequence, fit to the working shape.

One deterministic function, :func:`preprocess_case`, serves real and synthetic data alike, so that a
model never sees a difference in preprocessing between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.data.io import voxel_spacing


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings.

    Attributes:
        shape: working shape ``(X, Y, Z)`` every case is brought to; ``(X, Y)`` for a 2D study (its cases are
            2D images; ``canonical`` and ``spacing`` then do not apply and ``spacing`` must be absent).
        mode: ``fit`` scales a cropped case down (keeping its aspect ratio) only when it is larger than
            ``shape``, then pads it centred; ``pad`` pads/crops centred without resampling; ``resize``
            resamples to ``shape`` exactly (aspect ratio not kept).
        crop: crop to the bounding box of the non-zero brain first.
        zscore: z-score each sequence over the non-zero (brain) voxels.
        canonical: reorient voxel axes to RAS+ (from the affine) first, so cases stored in other
            orientations (LPS, flipped, permuted axes) reach the model as the training cases did.
        spacing: resample to this voxel size in mm (from the affine) before cropping; None keeps the
            stored grid (the CATphishing setting: crop, then fit to ``shape``).
    """

    shape: tuple[int, ...] = (64, 64, 64)
    mode: Literal["fit", "pad", "resize"] = "fit"
    crop: bool = True
    zscore: bool = True
    canonical: bool = True
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3) or any(int(s) < 4 for s in self.shape):
            raise ValueError(f"preprocess.shape must be 3 sizes >= 4 (2 for a 2D study), found {self.shape}")
        if self.mode not in ("fit", "pad", "resize"):
            raise ValueError(f"preprocess.mode must be fit, pad or resize, found {self.mode!r}")
        if self.spacing is not None and (len(self.spacing) != 3 or any(v <= 0 for v in self.spacing)):
            raise ValueError(f"preprocess.spacing must be 3 positive sizes in mm or absent, found {self.spacing}")
        if self.spacing is not None and len(self.shape) == 2:
            raise ValueError("preprocess.spacing applies to 3D studies only; leave it out for a 2D shape")

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the dimensionality of the cases this preprocessing takes."""
        return len(self.shape)


def brain_mask(images: np.ndarray) -> np.ndarray:
    """``(C, *S)`` -> ``(*S)`` bool: voxels non-zero in any sequence."""
    return np.any(images != 0, axis=0)


def brain_bbox(images: np.ndarray) -> tuple[slice, ...]:
    """Bounding box (slices) of the non-zero brain of ``(C, *S)`` images (2D or 3D); whole array if empty."""
    mask = brain_mask(images)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)  # type: ignore[return-value]


def crop_to_brain(images: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``(C, X, Y, Z)`` images (and ``(X, Y, Z)`` seg) to the brain's bounding box."""
    box = brain_bbox(images)
    return images[(slice(None), *box)], (seg[box] if seg is not None else None)


def zscore_nonzero(images: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``(C, X, Y, Z)`` over the brain (non-zero in any channel); outside stays 0."""
    mask = brain_mask(images)
    out = np.zeros_like(images, dtype=np.float32)
    if not mask.any():
        return out
    for c in range(images.shape[0]):
        vals = images[c][mask].astype(np.float64)
        sd = vals.std()
        out[c][mask] = ((vals - vals.mean()) / (sd if sd > 1e-8 else 1.0)).astype(np.float32)
    return out


def _pad_crop_offsets(spatial: tuple[int, ...], shape: tuple[int, ...]) -> list[int]:
    """Per axis, the input index that lands on output index 0 of a centred pad/crop (negative = padding)."""
    return [-((want - have) // 2) if have <= want else (have - want) // 2 for have, want in zip(spatial, shape)]


def _pad_crop_centered(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-pad with zeros / centre-crop the last ``len(shape)`` axes of ``arr`` to ``shape``."""
    spatial = arr.shape[-len(shape):]
    pads, slices = [], []
    for have, want, offset in zip(spatial, shape, _pad_crop_offsets(spatial, shape)):
        if have <= want:
            pads.append((-offset, want - have + offset))
            slices.append(slice(None))
        else:
            pads.append((0, 0))
            slices.append(slice(offset, offset + want))
    arr = arr[(..., *slices)]
    return np.pad(arr, [(0, 0)] * (arr.ndim - len(shape)) + pads)


def _resample(images: np.ndarray, seg: np.ndarray | None, size: tuple[int, ...]):
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[None]
    mode = "trilinear" if len(size) == 3 else "bilinear"
    images = F.interpolate(t, size=size, mode=mode, align_corners=False)[0].numpy()
    if seg is not None:
        s = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.float32))[None, None]
        seg = F.interpolate(s, size=size, mode="nearest")[0, 0].numpy().astype(np.int64)
    return images, seg


def _fit_size(spatial: tuple[int, ...], shape: tuple[int, ...], mode: str) -> tuple[int, ...] | None:
    """The size :func:`fit_to_shape` resamples to before its centred pad/crop, or None (no resampling)."""
    if mode == "resize":
        return tuple(shape) if tuple(spatial) != tuple(shape) else None
    if mode == "fit":
        scale = min(1.0, *(w / h for w, h in zip(shape, spatial)))
        if scale < 1.0:
            return tuple(max(1, min(w, int(round(h * scale)))) for w, h in zip(shape, spatial))
        return None
    if mode == "pad":
        return None
    raise ValueError(f"mode must be fit, pad or resize, found {mode!r}")


def _resampled_affine(affine: np.ndarray, before: tuple[int, ...], after: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid resampled from ``before`` to ``after`` voxels by :func:`_resample`
    (``align_corners=False``: output voxel ``j`` sits at input coordinate ``(j + 0.5) * s - 0.5``, ``s = before /
    after``), so world positions are kept."""
    scale = np.ones(3)
    scale[:len(before)] = np.array(before, dtype=float) / np.array(after, dtype=float)  # a 2D grid keeps its 3rd axis
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, dtype=float) @ step


def _shifted_affine(affine: np.ndarray, offsets) -> np.ndarray:
    """Affine of a grid whose voxel 0 is voxel ``offsets`` of the grid of ``affine`` (crop, pad)."""
    step = np.eye(4)
    step[:len(offsets), 3] = np.asarray(offsets, dtype=float)
    return np.asarray(affine, dtype=float) @ step


def fit_to_shape(images: np.ndarray, seg: np.ndarray | None, shape: tuple[int, ...], mode: str = "fit"):
    """Bring ``(C, *S)`` images and ``(*S)`` seg to ``shape`` (2D or 3D; see :class:`PreprocessConfig`)."""
    shape = tuple(int(s) for s in shape)
    size = _fit_size(tuple(images.shape[1:]), shape, mode)
    if size is not None:
        images, seg = _resample(images, seg, size)
    images = _pad_crop_centered(images, shape)
    if seg is not None:
        seg = _pad_crop_centered(seg, shape)
    return images.astype(np.float32), seg


def to_canonical(images: np.ndarray, seg: np.ndarray | None, affine: np.ndarray):
    """Reorient ``(C, X, Y, Z)`` images and ``(X, Y, Z)`` seg so the voxel axes are RAS+.

    Returns:
        ``(images, seg, affine)`` with the affine of the reoriented grid. A RAS+ input is returned as is.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    target = nio.axcodes2ornt(("R", "A", "S"))
    transform = nio.ornt_transform(ornt, target)
    if np.array_equal(transform, np.array([[0, 1], [1, 1], [2, 1]], dtype=transform.dtype)):
        return images, seg, affine
    spatial = images.shape[1:]
    images = np.stack([nio.apply_orientation(ch, transform) for ch in images])
    if seg is not None:
        seg = nio.apply_orientation(seg, transform)
    affine = affine @ nio.inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(images), (np.ascontiguousarray(seg) if seg is not None else None), affine


def resample_to_spacing(images: np.ndarray, seg: np.ndarray | None, affine: np.ndarray,
                        spacing: tuple[float, float, float]):
    """Resample to ``spacing`` mm (trilinear images, nearest seg); returns ``(images, seg, affine)``."""
    current = voxel_spacing(affine)
    target = np.asarray(spacing, dtype=float)
    if np.allclose(current, target, rtol=1e-3):
        return images, seg, affine
    before = tuple(images.shape[1:])
    size = tuple(max(1, int(round(n * c / t))) for n, c, t in zip(before, current, target))
    images, seg = _resample(images, seg, size)
    # the exact grid of the resampled array (voxel size n * c / round(n * c / t), world positions kept)
    return images, seg, _resampled_affine(affine, before, size)


def preprocess_case(
    images: np.ndarray, seg: np.ndarray | None, cfg: PreprocessConfig, affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The one preprocessing function for real and synthetic cases.

    Args:
        images: ``(4, X, Y, Z)`` raw intensities (0 outside the skull-stripped brain).
        seg: ``(X, Y, Z)`` integer segmentation, or None.
        cfg: the settings.
        affine: ``(4, 4)`` voxel-to-world affine; needed for ``cfg.spacing``, used for ``cfg.canonical``
            (without it the voxel axes are taken as already RAS+).

    Returns:
        ``(images, seg)``: ``(4, *cfg.shape)`` float32 and ``(*cfg.shape)`` int64 (or None).
    """
    images, seg, _ = preprocess_case_on_grid(images, seg, cfg, affine)
    return images, seg


def preprocess_case_on_grid(
    images: np.ndarray, seg: np.ndarray | None, cfg: PreprocessConfig, affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`preprocess_case`, also returning the voxel-to-world affine of the preprocessed grid.

    The affine follows every step (reorientation, resampling, crop, fit, pad), so a map computed on the
    preprocessed grid (e.g. voxel-wise class probabilities) lands on the right world positions when it is
    saved as NIfTI with it. Without ``affine`` the input grid is taken as the identity (voxel = mm).

    Returns:
        ``(images, seg, grid_affine)``: ``(4, *cfg.shape)`` float32, ``(*cfg.shape)`` int64 (or None) and
        the ``(4, 4)`` affine of the output grid.
    """
    images = np.asarray(images, dtype=np.float32)
    dims = len(cfg.shape)
    if images.ndim != dims + 1:
        what = "(C, X, Y, Z)" if dims == 3 else "(C, X, Y) (a 2D study: preprocess.shape has two sizes)"
        raise ValueError(f"images must be {what}, found shape {images.shape}")
    if seg is not None and seg.shape != images.shape[1:]:
        raise ValueError(f"seg shape {seg.shape} differs from image shape {images.shape[1:]}")
    if affine is not None and dims == 2:
        affine = np.asarray(affine, dtype=float)  # a 2D image: no reorientation, no resampling to a voxel size
    elif affine is not None:
        affine = np.asarray(affine, dtype=float)
        if cfg.canonical:
            images, seg, affine = to_canonical(images, seg, affine)
        if cfg.spacing is not None:
            images, seg, affine = resample_to_spacing(images, seg, affine, cfg.spacing)
    elif cfg.spacing is not None:
        raise ValueError("preprocess.spacing is set but no affine was given: the voxel size is unknown")
    else:
        affine = np.eye(4)
    if cfg.crop:
        box = brain_bbox(images)
        affine = _shifted_affine(affine, [b.start for b in box])
        images, seg = images[(slice(None), *box)], (seg[box] if seg is not None else None)
    if cfg.zscore:
        images = zscore_nonzero(images)
    shape = tuple(int(v) for v in cfg.shape)
    size = _fit_size(tuple(images.shape[1:]), shape, cfg.mode)
    if size is not None:
        affine = _resampled_affine(affine, tuple(images.shape[1:]), size)
    spatial = tuple(images.shape[1:]) if size is None else size
    affine = _shifted_affine(affine, _pad_crop_offsets(spatial, shape))
    images, seg = fit_to_shape(images, seg, shape, cfg.mode)
    if seg is not None:
        seg = seg.astype(np.int64)
    return images, seg, affine
