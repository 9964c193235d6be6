"""Fundus photograph preprocessing as in FedGAN (resize, CLAHE, per-image normalisation, gamma, [-1, 1]).

Pure numpy / scikit-image: usable in data loaders and in tests without torch.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.exposure import equalize_adapthist
from skimage.transform import resize

__all__ = ["preprocess_fundus"]


def preprocess_fundus(image: np.ndarray, size: int, *, clahe_clip: float = 0.01, gamma: float = 1.0,
                      grayscale: bool = False) -> np.ndarray:
    """Resize a fundus image, equalise its local contrast and scale it to [-1, 1].

    Steps: resize to ``size x size`` (``skimage.transform.resize``, bilinear with anti-aliasing) -> CLAHE
    (``skimage.exposure.equalize_adapthist``; on the HSV value channel of an RGB image, so hues are kept; on the
    single channel of a grey image) -> normalise to [0, 1] per image (min-max; a constant image gives 0) ->
    ``x ** gamma`` -> ``2 x - 1``.

    Args:
        image: ``(C, H, W)`` float in [0, 1], C = 1 (grey) or 3 (RGB).
        size: output side in pixels (>= 8: CLAHE's tiles are 1/8 of the side).
        clahe_clip: CLAHE clip limit in (0, 1] (higher = more contrast).
        gamma: exponent applied after normalisation (> 0; 1 = none, < 1 brightens dark fundus regions).
        grayscale: return one luminance channel (ITU-R 601 weights) instead of the input's channels.

    Returns:
        ``(C', size, size)`` float32 in [-1, 1], C' = 1 if ``grayscale`` (or C = 1) else 3.

    Raises:
        ValueError: ``image`` not ``(1|3, H, W)``, not finite or outside [0, 1]; ``size`` < 8; ``clahe_clip``
            outside (0, 1]; ``gamma`` <= 0.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with C = 1 or 3, found shape {tuple(image.shape)}")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ValueError(f"image must be finite and in [0, 1], found range [{np.nanmin(image):.3g}, "
                         f"{np.nanmax(image):.3g}] (divide 8-bit images by 255)")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, found {size!r}")
    if not 0 < clahe_clip <= 1:
        raise ValueError(f"clahe_clip must be in (0, 1], found {clahe_clip}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, found {gamma}")

    hwc = np.moveaxis(image.astype(np.float64), 0, -1)  # (H, W, C): scikit-image's channel-last layout
    hwc = np.clip(resize(hwc, (size, size), order=1, anti_aliasing=True), 0, 1)
    if grayscale and hwc.shape[-1] == 3:
        hwc = rgb2gray(hwc)[..., None]
    if hwc.shape[-1] == 3:
        hwc = equalize_adapthist(hwc, clip_limit=clahe_clip)  # CLAHE on the HSV value channel
    else:
        hwc = equalize_adapthist(hwc[..., 0], clip_limit=clahe_clip)[..., None]
    lo, hi = hwc.min(), hwc.max()
    hwc = (hwc - lo) / (hi - lo) if hi > lo else np.zeros_like(hwc)
    hwc = hwc ** gamma
    return np.moveaxis(2 * hwc - 1, -1, 0).astype(np.float32)
