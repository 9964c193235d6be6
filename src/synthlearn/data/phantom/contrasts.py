"""MRI contrasts of the phantom: tissue means, texture noise, lesion heterogeneity and per-site scanner
effects (PHANTOM.md, recipe steps 6-8).

Image model per sequence ``s`` (the same as ``torchio.LabelsToImage``, with PV channels ``c``)::

    I_s = sum_c PV_c * mu_(c,s) + (sum_c PV_c * sigma_c) * N(0, 1),   then  I_s *= 1 + h  inside the lesion

followed by the site's fixed chain of scanner effects: one bias field per case shared by the four
sequences (one coil), thick slices, blur, ghosting and motion (torchio's deterministic transforms, fed with
parameters drawn from the case's generator), Rician noise and a gamma curve. The result is skull-stripped
and each sequence divided by its 99.5th percentile inside the brain.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.data.contract import SEQUENCES
from synthlearn.data.phantom.sites import ScannerProfile
from synthlearn.data.phantom.tumour import Phenotype

#: All PV channels: the atlas channels, then the tumour channels.
CHANNELS: tuple[str, ...] = ("background", "gm", "wm", "csf",
                             "necrosis", "enhancing", "oedema", "core", "rim", "calcification")

#: Relative tissue means ``(4 sequences, 10 channels)`` (PHANTOM.md step 6). ``core`` FLAIR 0.42 is the
#: FLAIR-dark core of the T2-FLAIR mismatch sign; without the sign the core takes the rim's bright FLAIR.
MEANS = np.array([
    #  bg   gm   wm   csf  necr  enh  oed  core  rim  calc
    [0.0, .55, .75, .20, .25, .55, .50, .38, .40, .50],  # t1
    [0.0, .55, .75, .20, .25, 1.0, .50, .38, .40, .50],  # t1c
    [0.0, .60, .42, 1.0, .92, .65, .78, .86, .86, .15],  # t2
    [0.0, .60, .48, .12, .35, .70, .85, .42, .80, .20],  # flair
], dtype=np.float64)

#: Texture standard deviation per channel (absolute, in the units of :data:`MEANS`).
SIGMAS = np.array([0.0, .025, .02, .03, .05, .06, .04, .04, .04, .04], dtype=np.float64)


def case_means(scanner: ScannerProfile, phenotype: Phenotype, rng: np.random.Generator) -> np.ndarray:
    """Tissue means of one case: the table, the site's shifts, the phenotype and a small subject jitter.

    Returns:
        ``(4, 10)`` float64 means, sequences in :data:`~synthlearn.data.contract.SEQUENCES` order, channels
        in :data:`CHANNELS` order.
    """
    mu = MEANS.copy()
    for seq, channel, delta in scanner.contrast_shift:
        mu[SEQUENCES.index(seq), CHANNELS.index(channel)] += delta
    core, rim = CHANNELS.index("core"), CHANNELS.index("rim")
    flair = SEQUENCES.index("flair")
    if not phenotype.mismatch:  # FLAIR-bright core, like the rim
        mu[flair, core] = mu[flair, rim] + rng.normal(0, 0.03)
    mu[:, 1:] *= 1 + rng.normal(0, 0.03, (4, len(CHANNELS) - 1))  # subject-to-subject variation
    mu[SEQUENCES.index("t1c"), CHANNELS.index("enhancing")] *= rng.uniform(0.88, 1.08)  # contrast uptake
    return np.clip(mu, 0, None)


def render_contrasts(pv: torch.Tensor, means: np.ndarray, heterogeneity: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
    """PV mixture image with texture noise and lesion heterogeneity.

    Args:
        pv: ``(10, X, Y, Z)`` PV fractions in :data:`CHANNELS` order.
        means: ``(4, 10)`` tissue means (:func:`case_means`).
        heterogeneity: ``(X, Y, Z)`` relative intensity change inside the lesion (0 elsewhere).
        gen: torch generator for the texture noise.

    Returns:
        ``(4, X, Y, Z)`` float32 images.
    """
    mu = torch.as_tensor(means, dtype=torch.float32)
    sigma = torch.as_tensor(SIGMAS, dtype=torch.float32)
    mean_img = torch.einsum("sc,cxyz->sxyz", mu, pv)
    sd_img = torch.einsum("c,cxyz->xyz", sigma, pv)
    noise = torch.randn(mean_img.shape, generator=gen)
    return (mean_img + sd_img * noise) * (1 + heterogeneity)


def _thick_slices(volume: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Average slabs of ``factor`` voxels along ``axis`` and interpolate back (thick-slice acquisition).
    ``volume``: ``(X, Y, Z)``."""
    kernel = [1, 1, 1]
    kernel[axis] = factor
    low = F.avg_pool3d(volume[None, None], kernel_size=kernel, stride=kernel, ceil_mode=True)
    return F.interpolate(low, size=tuple(volume.shape), mode="trilinear", align_corners=False)[0, 0]


def scanner_effects(images: torch.Tensor, affine: np.ndarray, scanner: ScannerProfile,
                    rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Apply a site's scanner chain to one case.

    Order follows the acquisition: coil bias (one field for all sequences), resolution (thick slices,
    blur), k-space artefacts (motion, ghosting), Rician noise, intensity curve (gamma).

    Args:
        images: ``(4, X, Y, Z)`` float32 noise-free-ish images.
        affine: ``(4, 4)`` voxel-to-mm affine (blur and motion are in mm).
        scanner: the site's fingerprint.
        rng: draws the per-case parameters (bias coefficients, which sequences moved or ghosted, how).
        gen: draws the noise.

    Returns:
        ``(4, X, Y, Z)`` float32 images (non-negative).
    """
    import torchio as tio

    shape = tuple(images.shape[1:])
    # 1. coil bias: one order-3 polynomial field (torchio BiasField), evaluated on a 16^3 lattice and
    #    upsampled (it is smooth), then shared by all sequences
    n_coef = 20  # number of monomials of degree <= 3 in 3 variables
    coefficients = rng.uniform(-scanner.bias, scanner.bias, n_coef).tolist()
    field = tio.BiasField.generate_bias_field(np.zeros((1, 16, 16, 16)), 3, coefficients)
    field = F.interpolate(torch.as_tensor(field)[None, None], size=shape, mode="trilinear", align_corners=True)[0]
    images = images * field
    # 2. thick slices (2D acquisitions)
    images = images.clone()
    for seq, axis, factor in scanner.thick_slices:
        i = SEQUENCES.index(seq)
        images[i] = _thick_slices(images[i], axis, factor)
    # 3-5. blur, motion, ghosting with torchio's deterministic transforms
    transforms = []
    if scanner.blur_mm > 0:
        transforms.append(tio.Blur(std=(scanner.blur_mm,) * 3, copy=False))
    if scanner.motion is not None:
        prob, degrees, translation = scanner.motion
        for seq in SEQUENCES:
            if rng.random() < prob:
                n = int(rng.integers(1, 3))
                transforms.append(tio.Motion(
                    degrees=rng.uniform(-degrees, degrees, (n, 3)),
                    translation=rng.uniform(-translation, translation, (n, 3)),
                    times=np.sort(rng.uniform(0.35, 0.9, n)),
                    image_interpolation="linear", include=[seq], copy=False))
    if scanner.ghosting is not None:
        prob, num_ghosts, axis, intensity = scanner.ghosting
        for seq in SEQUENCES:
            if rng.random() < prob:
                transforms.append(tio.Ghosting(num_ghosts=num_ghosts, axis=axis,
                                               intensity=intensity * rng.uniform(0.6, 1.0),
                                               restore=0.02, include=[seq], copy=False))
    if transforms:
        subject = tio.Subject({seq: tio.ScalarImage(tensor=images[i:i + 1].clone(), affine=affine)
                               for i, seq in enumerate(SEQUENCES)})
        # torchio draws torch.rand(1) for each transform's probability: keep the caller's global RNG intact
        with torch.random.fork_rng(devices=[]):
            subject = tio.Compose(transforms, copy=False)(subject)
        images = torch.cat([subject[seq].data.float() for seq in SEQUENCES])
    # 6. Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    s = scanner.noise
    n = torch.randn((2,) + tuple(images.shape), generator=gen)
    images = torch.sqrt((images + s * n[0]) ** 2 + (s * n[1]) ** 2)
    # 7. intensity curve
    gamma = torch.as_tensor(scanner.gamma, dtype=torch.float32).view(4, 1, 1, 1)
    return images.clamp_min(0) ** gamma


def skull_strip_and_scale(images: torch.Tensor, brain_mask: torch.Tensor) -> np.ndarray:
    """Zero outside the brain and divide each sequence by its 99.5th percentile inside the brain.

    Args:
        images: ``(4, X, Y, Z)``.
        brain_mask: ``(X, Y, Z)`` bool.

    Returns:
        ``(4, X, Y, Z)`` float32 numpy array.
    """
    arr = images.numpy().astype(np.float32) * brain_mask.numpy()[None]
    mask = brain_mask.numpy()
    for i in range(arr.shape[0]):
        inside = arr[i][mask]
        scale = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        if scale > 0:
            arr[i] /= np.float32(scale)
    return arr
