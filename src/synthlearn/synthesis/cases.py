"""Turning decoded generator output into cases of the data contract.

The generator works on five channels: the four sequences in the generator's intensity scale (brain in
about [0.2, 1.5], background exactly 0; see :func:`generator_intensities`) and the whole-tumour mask. A
decoded sample becomes a case by:

1. **brain**: the decoded brain-mask channel above 0.5 for a generator with ``background = "filled"``; otherwise
   voxels whose mean over the four sequences exceeds ``brain_threshold`` (the lowest brain
   intensity of the scale, :data:`BRAIN_FLOOR`: every real brain voxel is at or above it in every sequence, so
   a decoded voxel below it is the decoder's blurred brain edge), largest connected component, holes filled;
   the background is set to exactly 0 (the contract's skull-stripped convention, on which preprocessing's
   crop and z-score rely);
2. **tumour**: the mask channel thresholded at ``mask_threshold`` inside the brain, keeping the largest
   connected component (26-connectivity; :func:`largest_component`);
3. writing the four sequences (float32) and the segmentation with :func:`synthlearn.data.io.write_case`
   (valid affine from the artifact's voxel size, centred on the origin, no site or patient strings in the
   header). The generator models the whole tumour only (paper 000), so the segmentation holds
   :data:`SYNTHETIC_TUMOUR_LABEL` for every tumour voxel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from synthlearn.data.contract import SEQUENCES
from synthlearn.data.preprocess import brain_mask

#: segmentation value of synthetic tumour voxels (whole tumour; sub-compartments are not generated)
SYNTHETIC_TUMOUR_LABEL = 1
#: brain intensities of the generator scale start here (background is 0)
BRAIN_FLOOR = 0.2
#: upper clip of the generator scale
INTENSITY_CEIL = 1.5


def generator_intensities(images: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map each sequence of ``(4, X, Y, Z)`` images to the generator scale: brain in
    ``[BRAIN_FLOOR, INTENSITY_CEIL]``, background exactly 0.

    Per sequence, brain voxels (non-zero in any sequence) are mapped linearly so that their ``low_pct`` and
    ``high_pct`` percentiles land on ``BRAIN_FLOOR`` and 1, then clipped. The map is affine inside the
    brain, so the z-score that task preprocessing applies later sees the same intensity distribution up to
    the clipped tails; keeping the brain away from 0 lets the decoder's background be told from dark brain.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), found shape {images.shape}")
    brain = brain_mask(images)
    out = np.zeros_like(images)
    if not brain.any():
        return out
    for c in range(images.shape[0]):
        vals = images[c][brain].astype(np.float64)
        lo, hi = np.percentile(vals, [low_pct, high_pct])
        span = hi - lo if hi - lo > 1e-8 else 1.0
        mapped = BRAIN_FLOOR + (1.0 - BRAIN_FLOOR) * (vals - lo) / span
        out[c][brain] = np.clip(mapped, BRAIN_FLOOR, INTENSITY_CEIL).astype(np.float32)
    return out


def largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Largest connected component of a boolean mask (``connectivity`` 1, 2 or 3 as in scipy: 3 = 26-
    neighbourhood in 3D); an empty mask stays empty. Ties go to the lowest label (scan order)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def count_components(mask: np.ndarray, connectivity: int = 3) -> int:
    """Number of connected components of a boolean mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=structure)[1])


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    """A decoded sample made into a case.

    Attributes:
        images: ``(4, X, Y, Z)`` float32, background exactly 0.
        seg: ``(X, Y, Z)`` int8, :data:`SYNTHETIC_TUMOUR_LABEL` on the kept tumour component.
        tumour_components: connected components of the thresholded mask before keeping the largest.
        tumour_voxels: voxels of the kept component.
        brain_voxels: voxels of the brain.
    """

    images: np.ndarray
    seg: np.ndarray
    tumour_components: int
    tumour_voxels: int
    brain_voxels: int


def postprocess_sample(decoded: np.ndarray, *, mask_threshold: float = 0.5,
                       brain_threshold: float = BRAIN_FLOOR) -> SyntheticCase:
    """Split the mask channel off a decoded sample, threshold it, keep the largest tumour component.

    Args:
        decoded: ``(5, X, Y, Z)``: four sequences in the generator scale, then the whole-tumour mask; or
            ``(6, X, Y, Z)`` with the brain mask last (a ``background = "filled"`` generator): the brain is then that
            channel above 0.5 (largest component, holes filled) and ``brain_threshold`` is not used.
        mask_threshold: threshold of the mask channel.
        brain_threshold: threshold of the mean of the four sequences that separates brain from background.
            At half the floor (0.1, the earlier default) the decoder's blurred edge joined the brain: 7-10 %
            more brain voxels than the real cases, whose dark shell lowered the brain mean that the task's
            z-score subtracts, shifting every tumour (docs/benchmarks.md, section 17).
    """
    decoded = np.asarray(decoded, dtype=np.float32)
    if decoded.ndim != 4 or decoded.shape[0] not in (len(SEQUENCES) + 1, len(SEQUENCES) + 2):
        raise ValueError(f"decoded sample must be (5, X, Y, Z) (4 sequences + tumour mask) or (6, X, Y, Z) (+ brain "
                         f"mask), found shape {decoded.shape}")
    if not np.isfinite(decoded).all():
        raise ValueError("decoded sample holds NaN or inf values")
    images = np.clip(decoded[: len(SEQUENCES)], 0.0, INTENSITY_CEIL)
    if decoded.shape[0] == len(SEQUENCES) + 2:
        brain = largest_component(decoded[len(SEQUENCES) + 1] > 0.5)
    else:
        brain = largest_component(images.mean(axis=0) > brain_threshold)
    brain = ndimage.binary_fill_holes(brain)
    tumour_raw = (decoded[len(SEQUENCES)] > mask_threshold) & brain
    n_components = count_components(tumour_raw)
    tumour = largest_component(tumour_raw)
    images = np.where(brain[None], np.maximum(images, 1e-3), 0.0).astype(np.float32)
    seg = np.where(tumour, SYNTHETIC_TUMOUR_LABEL, 0).astype(np.int8)
    return SyntheticCase(images=images, seg=seg, tumour_components=n_components,
                         tumour_voxels=int(tumour.sum()), brain_voxels=int(brain.sum()))


def centred_affine(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world affine with the given voxel size (mm), the volume centred on the origin."""
    if len(shape) != 3 or len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"shape and voxel_size must be 3 values (voxel_size > 0), found {shape}, {voxel_size}")
    affine = np.diag([float(v) for v in voxel_size] + [1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * v for n, v in zip(shape, voxel_size)]
    return affine
