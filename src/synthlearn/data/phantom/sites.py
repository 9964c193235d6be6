"""Site presets of the phantom: class mixes and scanner fingerprints (PHANTOM.md, recipe step 7).

The ``paper`` preset mirrors the CATphishing study (paper 000): training sites ``tcga``, ``utsw``, ``egd``
and held-out test sites ``nyu``, ``uwm``, ``ucsf``, ``upenn``, ``utswp2``. Class mixes follow the spirit of
the paper's Table 1 (TCGA and EGD richer in IDH-mutant lower-grade gliomas, UCSF mostly and UPenn almost only
glioblastoma), so the sites are non-IID in labels as well as in images. Each site has a fixed scanner
fingerprint: shifts of the tissue means (field strength, FLAIR CSF suppression, contrast dose) and a chain
of scanner effects with fixed parameters (bias field strength, resolution/blur, thick slices, ghosting,
motion, noise, gamma). The random parts (bias coefficients, noise, whether a case moved) are drawn per case.

``tiny`` reuses five of those sites (3 train + 2 test, both test sites holding both IDH classes) with
6 cases per site at 32^3 (6 mm voxels) for tests.
"""

from __future__ import annotations

import dataclasses

#: Tumour types in the order of :attr:`SitePreset.class_mix`.
TUMOUR_TYPES: tuple[str, ...] = ("glioblastoma", "astrocytoma", "oligodendroglioma")


@dataclasses.dataclass(frozen=True)
class ScannerProfile:
    """A site's fixed scanner fingerprint.

    Attributes:
        description: one line for humans.
        contrast_shift: ``(sequence, channel, delta)`` additions to the relative tissue means of
            :data:`synthlearn.data.phantom.contrasts.MEANS` (e.g. ``("flair", "csf", 0.15)`` = weak CSF
            suppression; ``("t1", "wm", -0.05)`` with ``("t1", "gm", 0.05)`` = lower 1.5 T GM/WM contrast).
        bias: magnitude of the order-3 polynomial bias-field coefficients (torchio ``BiasField``), drawn
            per case in ``U(-bias, bias)``; one field per case shared by all sequences (one coil).
        blur_mm: Gaussian blur standard deviation (mm, isotropic) for the acquisition resolution.
        thick_slices: ``(sequence, axis, factor)``: slabs of ``factor`` voxels along ``axis`` are averaged
            and interpolated back (2D acquisitions with thick slices).
        ghosting: ``(probability per sequence, number of ghosts, phase-encode axis, intensity)`` or None.
        motion: ``(probability per sequence, max degrees, max translation mm)`` or None.
        noise: Rician noise standard deviation relative to the tissue means (WM ~0.5-0.75).
        gamma: per-sequence intensity exponent (t1, t1c, t2, flair).
    """

    description: str
    contrast_shift: tuple[tuple[str, str, float], ...] = ()
    bias: float = 0.3
    blur_mm: float = 0.5
    thick_slices: tuple[tuple[str, int, int], ...] = ()
    ghosting: tuple[float, int, int, float] | None = None
    motion: tuple[float, float, float] | None = None
    noise: float = 0.025
    gamma: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SitePreset:
    """One phantom site.

    Attributes:
        name: site folder name.
        role: ``train`` or ``test``.
        class_mix: probabilities of (glioblastoma, astrocytoma, oligodendroglioma); a site of ``n`` cases
            gets these shares by largest-remainder rounding.
        size_scale: multiplies tumour radii (sites see different tumour sizes).
        scanner: the site's :class:`ScannerProfile`.
    """

    name: str
    role: str
    class_mix: tuple[float, float, float]
    size_scale: float
    scanner: ScannerProfile


@dataclasses.dataclass(frozen=True)
class StudyPreset:
    """A named set of sites with default size.

    Attributes:
        name: preset name.
        sites: the sites, train sites first.
        cases_per_site: default number of cases per site.
        shape: default working grid ``(X, Y, Z)``; it always spans a 192 mm cube.
        slices2d: write a 2D study instead: each case's axial slice through its largest tumour area (PHANTOM.md,
            2D variants; AsynDGAN's setting drops a case whose slice holds fewer than 10 tumour pixels).
    """

    name: str
    sites: tuple[SitePreset, ...]
    cases_per_site: int
    shape: tuple[int, int, int]
    slices2d: bool = False


_SITES: dict[str, SitePreset] = {s.name: s for s in (
    SitePreset("tcga", "train", (0.40, 0.35, 0.25), 1.00, ScannerProfile(
        "multi-vendor archive, mostly 1.5 T: low T1 GM/WM contrast, thick T2/FLAIR slices, moderate noise",
        contrast_shift=(("t1", "gm", 0.04), ("t1", "wm", -0.04), ("t1c", "gm", 0.04), ("t1c", "wm", -0.04),
                        ("flair", "csf", 0.06)),
        bias=0.2, blur_mm=1.2, thick_slices=(("t2", 2, 2), ("flair", 2, 2)),
        motion=(0.15, 2.0, 2.0), noise=0.035, gamma=(1.0, 1.0, 1.05, 1.0))),
    SitePreset("utsw", "train", (0.62, 0.23, 0.15), 0.95, ScannerProfile(
        "3 T, sharp and quiet, strong bias field, bright contrast enhancement",
        contrast_shift=(("t1", "gm", -0.03), ("t1", "wm", 0.04), ("t1c", "enhancing", 0.08),
                        ("t2", "wm", -0.04)),
        bias=0.35, blur_mm=0.3, ghosting=(0.25, 4, 1, 0.45), noise=0.015,
        gamma=(0.9, 0.9, 1.0, 1.1))),
    SitePreset("egd", "train", (0.45, 0.32, 0.23), 1.05, ScannerProfile(
        "mixed 1.5/3 T: weak FLAIR CSF suppression, 2D FLAIR with thick slices, darker T2 CSF",
        contrast_shift=(("flair", "csf", 0.20), ("flair", "gm", -0.04), ("t2", "csf", -0.15),
                        ("t1c", "enhancing", -0.08)),
        bias=0.25, blur_mm=0.8, thick_slices=(("flair", 2, 3),), noise=0.03,
        gamma=(1.15, 1.1, 1.0, 0.85))),
    SitePreset("nyu", "test", (0.60, 0.25, 0.15), 1.00, ScannerProfile(
        "3 T with ghosting along the phase-encode axis, thick T1 slices",
        contrast_shift=(("t1", "csf", 0.06), ("flair", "wm", 0.04), ("t2", "gm", 0.05)),
        bias=0.3, blur_mm=0.6, thick_slices=(("t1", 0, 2),), ghosting=(0.5, 3, 1, 0.6), noise=0.02,
        gamma=(1.0, 1.0, 0.9, 1.0))),
    SitePreset("uwm", "test", (0.65, 0.22, 0.13), 1.10, ScannerProfile(
        "1.5 T, noisy and blurred, coronal FLAIR, low T1 contrast",
        contrast_shift=(("t1", "gm", 0.05), ("t1", "wm", -0.05), ("t1c", "gm", 0.05), ("t1c", "wm", -0.05),
                        ("flair", "csf", 0.10)),
        bias=0.2, blur_mm=1.5, thick_slices=(("flair", 1, 2), ("t2", 2, 2)), noise=0.05,
        gamma=(1.0, 1.0, 1.1, 1.1))),
    SitePreset("ucsf", "test", (0.78, 0.13, 0.09), 0.95, ScannerProfile(
        "3 T high resolution, very strong bias field, compressed T2",
        contrast_shift=(("t2", "wm", -0.06), ("t2", "csf", -0.05), ("flair", "gm", 0.04)),
        bias=0.45, blur_mm=0.2, noise=0.012, gamma=(1.0, 1.0, 0.8, 1.0))),
    SitePreset("upenn", "test", (0.96, 0.03, 0.01), 1.05, ScannerProfile(
        "3 T, resampled and smoothed (BraTS-style preprocessing), occasional motion",
        contrast_shift=(("flair", "csf", 0.05), ("t1c", "enhancing", 0.05)),
        bias=0.15, blur_mm=1.0, motion=(0.3, 3.0, 3.0), noise=0.02, gamma=(1.05, 1.05, 1.05, 1.05))),
    SitePreset("utswp2", "test", (0.58, 0.25, 0.17), 0.90, ScannerProfile(
        "UTSW, later period: as utsw with a newer coil (weaker bias) and a lower contrast dose",
        contrast_shift=(("t1", "gm", -0.03), ("t1", "wm", 0.04), ("t1c", "enhancing", -0.06),
                        ("t2", "wm", -0.04)),
        bias=0.3, blur_mm=0.4, ghosting=(0.15, 4, 1, 0.35), noise=0.02, gamma=(0.92, 0.92, 1.0, 1.05))),
)}

STUDY_PRESETS: dict[str, StudyPreset] = {
    # 48 cases per site: 144 training cases pooled vs 48 at a single site, 240 held-out test cases;
    # about 400 cases x ~0.5 s on one core.
    "paper": StudyPreset(
        "paper",
        tuple(_SITES[n] for n in ("tcga", "utsw", "egd", "nyu", "uwm", "ucsf", "upenn", "utswp2")),
        cases_per_site=48, shape=(64, 64, 64)),
    "tiny": StudyPreset(
        "tiny",
        tuple(_SITES[n] for n in ("tcga", "utsw", "egd", "nyu", "ucsf")),
        cases_per_site=6, shape=(32, 32, 32)),
    # the same studies as 2D slices (64x64 and 32x32 images)
    "slices2d": StudyPreset(
        "slices2d",
        tuple(_SITES[n] for n in ("tcga", "utsw", "egd", "nyu", "uwm", "ucsf", "upenn", "utswp2")),
        cases_per_site=48, shape=(64, 64, 64), slices2d=True),
    "tiny-slices2d": StudyPreset(
        "tiny-slices2d",
        tuple(_SITES[n] for n in ("tcga", "utsw", "egd", "nyu", "ucsf")),
        cases_per_site=6, shape=(32, 32, 32), slices2d=True),
}

#: Names of the study presets (``make-phantoms --preset``).
PRESETS: tuple[str, ...] = tuple(STUDY_PRESETS)


def site_preset(name: str) -> SitePreset:
    """The :class:`SitePreset` called ``name`` (any site of any preset).

    Raises:
        ValueError: unknown site name.
    """
    if name not in _SITES:
        raise ValueError(f"unknown phantom site {name!r}; expected one of {sorted(_SITES)}")
    return _SITES[name]


def allocate_classes(class_mix: tuple[float, ...], n: int) -> list[int]:
    """Case counts per tumour type for ``n`` cases (largest-remainder rounding of ``class_mix * n``)."""
    total = sum(class_mix)
    quotas = [p / total * n for p in class_mix]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts
