"""A 2D diabetic-retinopathy (DR) fundus phantom graded 0-4 (FedGAN's setting; PHANTOM.md), written as a 2D study
of the data contract.

Each image: scikit-image's bundled colour fundus photograph (``skimage.data.retina()``, CC0; no download), cropped to
its circular field of view (FOV) and resized to ``side`` -> a random small rotation and a left/right flip (left and
right eyes) -> vessel-contrast jitter (the fine detail, vessels and disc rim, scaled against the smooth background)
-> per-image colour gains and a smooth illumination field -> procedural lesions for the grade (counts per image,
jittered +-20 %):

=========  ==============  ============  =============  ================
grade      microaneurysms  haemorrhages  hard exudates  cotton-wool spots
=========  ==============  ============  =============  ================
0 none     0               0             0              0
1 mild     6               0             0              0
2 moderate 12              5             8              0
3 severe   20              15            15             4
4 PDR      25              20            20             6 (+ neovascularisation near the disc, p = 0.8)
=========  ==============  ============  =============  ================

Microaneurysms are tiny dark red dots, haemorrhages larger dark red blots (ellipses), hard exudates bright yellow
spots in one to three clusters, cotton-wool spots pale fuzzy patches, neovascularisation fine tortuous dark vessels
starting at the optic disc. Sizes are in units of ``side / 64`` with a floor in pixels so that at 32x32 every lesion
still darkens or brightens at least one pixel; the counts are not scaled (they are what a grader counts). -> the
site's :class:`Camera` (blur, channel gains, gamma, vignetting, noise) -> 0 outside the FOV. The lesion mask is 1 at
every lesion pixel of any type (anti-aliased coverage > 0.3), 0 elsewhere.

A study holds training sites ``site_01 .. site_NN`` (role ``train``) and one site ``test`` (role ``test``, grades
balanced); sequences ``r``, ``g``, ``b`` (reflectance in [0, 1], 0 outside the FOV); segmentation 1 in the FOV
(:func:`field_of_view`: the region a voxel-wise task model reads the grade on; the lesions are the grade's evidence,
not a mask a grade-0 image could have, and their pixel counts per grade go to ``fundus_phantom.json``); one
label column ``grade`` with values ``0 .. 4``. Every site has its own camera. Splits of the grades over sites:

- ``iid``: every site holds the grades in the DR-like screening prevalence :data:`IID_PREVALENCE`
  (0.40 / 0.20 / 0.20 / 0.10 / 0.10: grade 0 the largest class as in screening, yet enough severe and
  proliferative cases to learn from; real EyePACS is ~0.73 / 0.07 / 0.15 / 0.025 / 0.02), stratified: each site's
  grade counts are its size times the prevalence, rounded by largest remainder, in random order.
- ``non-iid`` (pathological, FedGAN's non-IID setting): site ``k`` (0-based) holds only the ``grades_per_site``
  grades ``(k * grades_per_site + j) mod 5``, ``j = 0 ..`` (round robin, so all five grades are covered when
  ``n_sites * grades_per_site >= 5``), equally many of each.
- ``pool``: one training site ``pool`` of ``n_sites * cases_per_site`` images (the federation's size) in the
  prevalence :data:`IID_PREVALENCE`, each image from its own freshly drawn camera (a pooled public collection from
  many clinics), for pretraining. Its random stream differs from the federation sites' (which are the same for
  ``iid`` and ``non-iid``), so its images are disjoint from theirs.

The test site comes from its own stream, the same for every split and ``n_sites``: with one seed, pretraining on
``pool`` and training on a federation are scored on the same test images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import data as skimage_data
from skimage.transform import resize
from tqdm.auto import tqdm

from synthlearn.data.contract import Labels, LabelSchema
from synthlearn.data.io import atomic_write_text, write_case, write_labels_csv
from synthlearn.data.layouts import write_study_json

log = logging.getLogger(__name__)

SEQUENCES_RGB: tuple[str, ...] = ("r", "g", "b")
#: lesion label in the segmentation (any lesion type)
LESION = 1
GRADES: tuple[str, ...] = ("0", "1", "2", "3", "4")
FUNDUS_LABELS = LabelSchema((("grade", GRADES),))
#: lesions per image for grades 0..4 (PHANTOM.md)
LESION_COUNTS: dict[str, tuple[int, int, int, int, int]] = {
    "microaneurysms": (0, 6, 12, 20, 25),
    "haemorrhages": (0, 0, 5, 15, 20),
    "hard_exudates": (0, 0, 8, 15, 20),
    "cotton_wool_spots": (0, 0, 0, 4, 6),
}
#: probability of neovascularisation at grade 4 (proliferative DR)
NEOVASCULARISATION_P = 0.8
#: grade prevalence of the ``iid`` and ``pool`` splits (module docstring)
IID_PREVALENCE: tuple[float, ...] = (0.40, 0.20, 0.20, 0.10, 0.10)
SPLITS: tuple[str, ...] = ("iid", "non-iid", "pool")
#: presets: (image side, federation sites, images per site, test images)
FUNDUS_PRESETS: dict[str, tuple[int, int, int, int]] = {"fundus": (64, 10, 60, 200), "tiny-fundus": (32, 3, 8, 10)}
#: FOV diameter in mm (about 45 degrees of retina), for the affine
FOV_MM = 12.0


@dataclasses.dataclass(frozen=True)
class Camera:
    """A site's fundus camera fingerprint, applied after the lesions.

    Attributes:
        gains: per-channel (R, G, B) multiplicative colour gains.
        gamma: exponent applied to the image in [0, 1] (> 1 darkens mid-tones).
        blur: Gaussian blur SD as a fraction of the image side (0.01 = 0.64 px at 64x64).
        vignetting: brightness lost at the FOV rim (quadratic fall-off from the centre).
        noise_sd: SD of additive Gaussian noise (reflectance units).
    """

    gains: tuple[float, float, float]
    gamma: float
    blur: float
    vignetting: float
    noise_sd: float


def site_camera(rng: np.random.Generator) -> Camera:
    """Draw one site's :class:`Camera` from ``rng``."""
    r, g, b = (float(v) for v in rng.uniform(0.85, 1.15, size=3))
    gains = (r, g, b)
    return Camera(gains=gains, gamma=float(rng.uniform(0.8, 1.25)), blur=float(rng.uniform(0.0, 0.012)),
                  vignetting=float(rng.uniform(0.0, 0.35)), noise_sd=float(rng.uniform(0.005, 0.03)))


@dataclasses.dataclass(frozen=True)
class _Base:
    """The retina photograph at one side: smooth background and fine detail (vessels), FOV, optic disc."""

    smooth: np.ndarray  # (3, side, side)
    detail: np.ndarray  # (3, side, side)
    fov_radius: float  # pixels, centred at ((side - 1) / 2, (side - 1) / 2)
    disc: tuple[float, float]  # (row, col) offset of the optic disc from the centre, in FOV radii
    disc_radius: float  # in FOV radii


@functools.lru_cache(maxsize=8)
def _base(side: int) -> _Base:
    """The bundled retina cropped to its FOV and resized to ``side`` (cached per side: the resize takes ~0.3 s)."""
    full = skimage_data.retina().astype(np.float32) / 255.0  # (1411, 1411, 3), a full FOV circle
    inside = full.sum(-1) > 0.15
    rows, cols = np.nonzero(inside)
    cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    radius_full = max(rows.max() - rows.min(), cols.max() - cols.min()) / 2
    half = int(np.ceil(radius_full * 1.02))
    crop = np.zeros((2 * half, 2 * half, 3), np.float32)  # square around the FOV, zero-padded if it overhangs
    y0, x0 = round(cy) - half, round(cx) - half
    ys, xs = slice(max(y0, 0), min(y0 + 2 * half, full.shape[0])), slice(max(x0, 0), min(x0 + 2 * half, full.shape[1]))
    crop[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = full[ys, xs]
    # optic disc: the brightest smoothed spot inside the FOV
    brightness = ndimage.gaussian_filter(crop.mean(-1), half / 35)
    yy, xx = np.mgrid[0:2 * half, 0:2 * half]
    brightness[(yy - half) ** 2 + (xx - half) ** 2 > (0.9 * radius_full) ** 2] = 0
    dy, dx = np.unravel_index(int(brightness.argmax()), brightness.shape)
    disc = ((dy - half) / radius_full, (dx - half) / radius_full)

    image = resize(crop, (side, side), anti_aliasing=True, order=1).astype(np.float32)
    fov_radius = radius_full / half * side / 2 - 0.5
    c = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side]
    fov = ((yy - c) ** 2 + (xx - c) ** 2 <= fov_radius ** 2).astype(np.float32)
    # normalised convolution: the smooth background inside the FOV without the black outside bleeding in
    sigma = side / 16
    weight = ndimage.gaussian_filter(fov, sigma) + 1e-6
    smooth = np.stack([ndimage.gaussian_filter(image[..., k] * fov, sigma) / weight for k in range(3)])
    detail = np.moveaxis(image, -1, 0) * fov - smooth * fov
    return _Base(smooth=smooth * fov, detail=detail, fov_radius=fov_radius, disc=disc, disc_radius=0.13)


def _smooth_field(rng: np.random.Generator, side: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((side, side)), sigma)
    return field / (field.std() + 1e-8)


def _centres(rng: np.random.Generator, n: int, side: int, base: _Base, disc_rc: tuple[float, float]) -> np.ndarray:
    """``(n, 2)`` lesion centres (row, col) in the FOV (within 0.9 of its radius), off the optic disc."""
    c = (side - 1) / 2
    r_max = 0.9 * base.fov_radius
    out = np.zeros((0, 2))
    while len(out) < n:
        cand = rng.uniform(c - r_max, c + r_max, size=(4 * n + 4, 2))
        ok = ((cand - c) ** 2).sum(1) <= r_max ** 2
        ok &= ((cand - np.array(disc_rc)) ** 2).sum(1) > (1.4 * base.disc_radius * base.fov_radius) ** 2
        out = np.concatenate([out, cand[ok]])
    return out[:n]


def _ellipses(centres: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray, side: int) -> np.ndarray:
    """``(side, side)`` anti-aliased coverage in [0, 1] of ellipses (semi-axes ``a``, ``b`` pixels, angle ``theta``),
    the maximum over them (0 where there are none)."""
    if len(centres) == 0:
        return np.zeros((side, side), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    dy = yy[None] - centres[:, 0, None, None]
    dx = xx[None] - centres[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * cos + dy * sin) / a[:, None, None]
    v = (-dx * sin + dy * cos) / b[:, None, None]
    d = np.sqrt(u ** 2 + v ** 2)
    # distance to the rim in pixels (approximately, along the short axis) + 0.5: the pixel's covered fraction
    return np.clip((1 - d) * b[:, None, None] + 0.5, 0, 1).max(0).astype(np.float32)


def _blobs(centres: np.ndarray, sigma: np.ndarray, side: int) -> np.ndarray:
    """``(side, side)`` Gaussian blobs (peak 1, SD ``sigma`` pixels), the maximum over them."""
    if len(centres) == 0:
        return np.zeros((side, side), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return np.exp(-0.5 * d2 / sigma[:, None, None] ** 2).max(0).astype(np.float32)


def _neovessels(rng: np.random.Generator, side: int, base: _Base, disc_rc: tuple[float, float]) -> np.ndarray:
    """``(side, side)`` coverage of 2-4 fine tortuous vessels that leave the optic disc rim (random walks)."""
    scale = side / 64
    acc = np.zeros((side + 1, side + 1), np.float32)
    step = 0.35
    for _ in range(rng.integers(2, 5)):
        angle = rng.uniform(0, 2 * np.pi)
        rim = base.disc_radius * base.fov_radius
        pos = np.array(disc_rc) + rim * np.array([np.sin(angle), np.cos(angle)])
        heading = angle + rng.normal(0, 0.5)
        for _ in range(int(rng.uniform(14, 26) * scale / step)):
            heading += rng.normal(0, 0.45)  # tortuous: the heading wanders
            pos = pos + step * np.array([np.sin(heading), np.cos(heading)])
            r, c = pos
            if not (0 <= r < side - 1 and 0 <= c < side - 1):
                break
            r0, c0 = int(r), int(c)
            fr, fc = r - r0, c - c0  # bilinear splat
            acc[r0, c0] += (1 - fr) * (1 - fc)
            acc[r0 + 1, c0] += fr * (1 - fc)
            acc[r0, c0 + 1] += (1 - fr) * fc
            acc[r0 + 1, c0 + 1] += fr * fc
    return np.clip(ndimage.gaussian_filter(acc[:side, :side], 0.4) * 1.6, 0, 1)


def _darken(image: np.ndarray, coverage: np.ndarray, strength: float, tint: tuple[float, float, float]) -> None:
    """Dark red lesion: each channel multiplied towards ``tint`` (in place)."""
    image *= 1 - strength * coverage[None] * (1 - np.array(tint, np.float32)[:, None, None])


def _blend(image: np.ndarray, coverage: np.ndarray, strength: float, colour: tuple[float, float, float]) -> None:
    """Bright lesion: the image blended towards ``colour`` (in place)."""
    alpha = strength * coverage[None]
    image *= 1 - alpha
    image += alpha * np.array(colour, np.float32)[:, None, None]


def render_fundus(rng: np.random.Generator, grade: int, side: int, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """One colour fundus image of DR ``grade`` (module docstring) seen through ``camera``.

    Args:
        rng: the random stream (the same state gives the same image).
        grade: DR grade, 0 (none) .. 4 (proliferative).
        side: image side in pixels (>= 16).
        camera: the site's camera fingerprint (:func:`site_camera`).

    Returns:
        ``(3, side, side)`` float32 RGB in [0, 1] (0 outside the FOV, > 0 inside) and ``(side, side)`` uint8 lesion
        mask (1 at pixels of any lesion, 0 elsewhere; all 0 at grade 0).

    Raises:
        ValueError: ``grade`` not in 0..4 or ``side`` < 16.
    """
    if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)) or not 0 <= grade <= 4:
        raise ValueError(f"grade must be an integer in 0..4, found {grade!r}")
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 16:
        raise ValueError(f"side must be an integer >= 16, found {side!r}")
    base = _base(int(side))
    c = (side - 1) / 2
    scale = side / 64

    # geometry: small rotation about the FOV centre and a left/right flip (the other eye)
    theta = np.deg2rad(rng.uniform(-12, 12))
    flip = bool(rng.integers(2))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    ry, rx = yy - c, xx - c
    src_y = c + np.cos(theta) * ry - np.sin(theta) * rx
    src_x = c + np.sin(theta) * ry + np.cos(theta) * rx
    if flip:
        src_x = 2 * c - src_x
    stack = np.concatenate([base.smooth, base.detail])
    warped = np.stack([ndimage.map_coordinates(ch, [src_y, src_x], order=1, mode="constant") for ch in stack])
    # the disc follows the same transform (inverse of the sampling map)
    dy, dx = base.disc[0] * base.fov_radius, base.disc[1] * base.fov_radius * (-1 if flip else 1)
    disc_rc = (c + np.cos(theta) * dy + np.sin(theta) * dx, c - np.sin(theta) * dy + np.cos(theta) * dx)

    # vessel contrast, colour and illumination of this photograph
    image = warped[:3] + rng.uniform(0.6, 1.4) * warped[3:]
    image *= rng.uniform(0.93, 1.07, size=(3, 1, 1)) * rng.uniform(0.85, 1.15)
    image *= 1 + 0.08 * _smooth_field(rng, side, side / 4)[None]
    image = np.clip(image, 0, 1).astype(np.float32)

    def count(kind: str) -> int:
        mean = LESION_COUNTS[kind][grade]
        return round(mean * rng.uniform(0.8, 1.2)) if mean else 0

    coverages = []
    # cotton-wool spots: pale fuzzy patches
    n = count("cotton_wool_spots")
    cws = _blobs(_centres(rng, n, side, base, disc_rc), rng.uniform(1.2, 2.0, n) * max(scale, 0.75), side)
    _blend(image, cws, 0.7, (0.97, 0.88, 0.80))
    coverages.append(cws)
    # hard exudates: small bright yellow spots in 1-3 clusters
    n = count("hard_exudates")
    clusters = _centres(rng, int(rng.integers(1, 4)), side, base, disc_rc)
    spots = clusters[rng.integers(len(clusters), size=n)] + rng.normal(0, 0.09 * side, size=(n, 2))
    keep = ((spots - c) ** 2).sum(1) <= (0.92 * base.fov_radius) ** 2
    spots = spots[keep]
    r = np.maximum(rng.uniform(0.5, 1.0, len(spots)) * 1.2 * scale, 0.55)
    exudates = _ellipses(spots, r, r, np.zeros(len(spots)), side)
    _blend(image, exudates, 0.85, (1.0, 0.92, 0.45))
    coverages.append(exudates)
    # haemorrhages: larger dark red blots
    n = count("haemorrhages")
    b = np.maximum(rng.uniform(0.8, 1.5, n) * scale, 0.7)
    haem = _ellipses(_centres(rng, n, side, base, disc_rc), b * rng.uniform(1.0, 1.5, n), b,
                     rng.uniform(0, np.pi, n), side)
    _darken(image, haem, 0.85, (0.45, 0.2, 0.3))
    coverages.append(haem)
    # microaneurysms: tiny dark red dots
    n = count("microaneurysms")
    r = np.maximum(rng.uniform(0.5, 0.8, n) * scale, 0.6)
    ma = _ellipses(_centres(rng, n, side, base, disc_rc), r, r, np.zeros(n), side)
    _darken(image, ma, 0.8, (0.5, 0.25, 0.35))
    coverages.append(ma)
    if grade == 4 and rng.uniform() < NEOVASCULARISATION_P:
        nv = _neovessels(rng, side, base, disc_rc)
        _darken(image, nv, 0.6, (0.55, 0.3, 0.35))
        coverages.append(nv)

    # the site's camera
    fov = (yy - c) ** 2 + (xx - c) ** 2 <= base.fov_radius ** 2
    if camera.blur > 0:
        image = ndimage.gaussian_filter(image, (0, camera.blur * side, camera.blur * side))
    image = image * np.array(camera.gains, np.float32)[:, None, None]
    image = np.clip(image, 0, 1) ** camera.gamma
    image = image * (1 - camera.vignetting * ((ry ** 2 + rx ** 2) / base.fov_radius ** 2))[None]
    image = image + rng.normal(0, camera.noise_sd, image.shape)
    image = np.where(fov[None], np.clip(image, 1e-3, 1.0), 0.0).astype(np.float32)
    mask = (np.max(coverages, axis=0) > 0.3) & fov
    return image, mask.astype(np.uint8)


def _quota(n: int, weights: tuple[float, ...]) -> np.ndarray:
    """Largest-remainder split of ``n`` items by ``weights``: ``(len(weights),)`` int counts summing to ``n``."""
    w = np.asarray(weights, np.float64) / sum(weights)
    exact = n * w
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _grade_list(rng: np.random.Generator, n: int, weights: tuple[float, ...]) -> list[int]:
    """``n`` grades with counts :func:`_quota` of ``weights`` (one weight per grade 0..4), in random order."""
    grades = np.repeat(np.arange(5), _quota(n, weights))
    return [int(g) for g in rng.permutation(grades)]


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, found {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, found {value}")


def field_of_view(images: np.ndarray) -> np.ndarray:
    """``(side, side)`` uint8: 1 where any channel of ``(3, side, side)`` is non-zero (the camera's circular field
    of view; the phantom is 0 outside it and above 0 inside)."""
    return np.any(np.asarray(images) != 0, axis=0).astype(np.uint8)


def make_fundus_study(out: str | Path, preset: str = "fundus", *, n_sites: int | None = None, split: str = "non-iid",
                      cases_per_site: int | None = None, grades_per_site: int = 2, test_cases: int | None = None,
                      seed: int = 0, progress: bool = True) -> Path:
    """Write the DR fundus phantom study (module docstring) to ``out`` (new or empty).

    Args:
        out: the study folder (created; must be empty if it exists).
        preset: ``fundus`` (64x64, 10 sites x 60 images, 200 test images) or ``tiny-fundus`` (32x32, 3 sites x 8,
            10 test images); :data:`FUNDUS_PRESETS`.
        n_sites: federation sites (default: the preset's); for ``pool``, the pool holds ``n_sites * cases_per_site``.
        split: ``iid``, ``non-iid`` or ``pool`` (module docstring).
        cases_per_site: images per training site (default: the preset's).
        grades_per_site: grades each site holds under ``non-iid`` (1..5); unused by the other splits.
        test_cases: images of the test site, grades balanced (default: the preset's).
        seed: the study's seed; the same arguments give the same bytes.
        progress: show a progress bar.

    Returns:
        ``out``. Besides the study, ``fundus_phantom.json`` records the arguments, the cameras and every site's
        grade counts.

    Raises:
        ValueError: unknown ``preset`` or ``split``, a count below 1, ``grades_per_site`` outside 1..5.
        TypeError: a count that is not an integer.
        FileExistsError: ``out`` is not empty.
    """
    if preset not in FUNDUS_PRESETS:
        raise ValueError(f"preset must be one of {list(FUNDUS_PRESETS)}, found {preset!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, found {split!r}")
    side, default_sites, default_cases, default_test = FUNDUS_PRESETS[preset]
    n_sites = default_sites if n_sites is None else n_sites
    cases_per_site = default_cases if cases_per_site is None else cases_per_site
    test_cases = default_test if test_cases is None else test_cases
    _check_count("n_sites", n_sites, 1)
    _check_count("cases_per_site", cases_per_site, 1)
    _check_count("test_cases", test_cases, 1)
    _check_count("grades_per_site", grades_per_site, 1)
    if grades_per_site > 5:
        raise ValueError(f"grades_per_site must be in 1..5 (there are five grades), found {grades_per_site}")
    _check_count("seed", seed, 0)
    if split == "non-iid" and n_sites * grades_per_site < 5:
        log.warning("non-iid split: %d site(s) x %d grade(s) cover only %d of the five grades", n_sites,
                    grades_per_site, n_sites * grades_per_site)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the fundus phantom is written into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)

    # (site, role, grades, camera or None = one per image, rng of the images)
    plans: list[tuple[str, str, list[int], Camera | None, np.random.Generator]] = []
    if split == "pool":
        rng = np.random.default_rng([seed, 2])
        plans.append(("pool", "train", _grade_list(rng, n_sites * cases_per_site, IID_PREVALENCE), None, rng))
    else:
        for k in range(n_sites):
            camera = site_camera(np.random.default_rng([seed, 0, k, 0]))
            rng = np.random.default_rng([seed, 0, k, 1])
            if split == "iid":
                weights = IID_PREVALENCE
            else:
                held = {(k * grades_per_site + j) % 5 for j in range(grades_per_site)}
                weights = tuple(1.0 if g in held else 0.0 for g in range(5))
            plans.append((f"site_{k + 1:02d}", "train", _grade_list(rng, cases_per_site, weights), camera, rng))
    rng = np.random.default_rng([seed, 1])
    plans.append(("test", "test", _grade_list(rng, test_cases, (1.0,) * 5), site_camera(rng), rng))

    spacing = FOV_MM / side
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    sites: dict[str, str] = {}
    record: dict[str, dict] = {}
    lesion_pixels: dict[str, list[int]] = {}
    bar = tqdm(total=sum(len(p[2]) for p in plans), desc=f"phantom {preset}", unit="image", disable=not progress)
    for site, role, grades, camera, rng in plans:
        rows = []
        for i, grade in enumerate(grades):
            images, lesions = render_fundus(rng, grade, side, camera or site_camera(rng))
            case_id = f"{site}_{i:03d}"
            # the segmentation is the camera's field of view: the region the voxel-wise task model reads the
            # grade on (a grade-0 image has no lesion, and a lesion mask would leave it nothing to learn from)
            write_case(out / site, case_id, images, field_of_view(images), affine, SEQUENCES_RGB)
            lesion_pixels.setdefault(site, []).append(int(lesions.sum()))
            rows.append((case_id, Labels({"grade": str(grade)})))
            bar.update(1)
        write_labels_csv(out / site / "labels.csv", rows, ("grade",))
        sites[site] = role
        record[site] = {"role": role, "grade_counts": {g: grades.count(int(g)) for g in GRADES},
                        "lesion_pixels_mean_by_grade": {
                            g: float(np.mean([n for n, gr in zip(lesion_pixels.get(site, []), grades) if gr == int(g)]))
                            for g in GRADES if int(g) in grades},
                        "camera": dataclasses.asdict(camera) if camera else "one per image"}
    bar.close()
    atomic_write_text(out / "fundus_phantom.json", json.dumps(
        {"generator": "synthlearn.data.phantom.fundus", "preset": preset, "seed": seed, "split": split, "side": side,
         "n_sites": n_sites, "cases_per_site": cases_per_site, "test_cases": test_cases,
         "grades_per_site": grades_per_site if split == "non-iid" else None,
         "prevalence": list(IID_PREVALENCE) if split in ("iid", "pool") else None,
         "lesion_counts": {k: list(v) for k, v in LESION_COUNTS.items()}, "sites": record}, indent=2) + "\n")
    write_study_json(out, sites, sequences=SEQUENCES_RGB, labels=FUNDUS_LABELS)
    return out


__all__ = [
    "FUNDUS_LABELS",
    "FUNDUS_PRESETS",
    "GRADES",
    "IID_PREVALENCE",
    "LESION",
    "LESION_COUNTS",
    "SEQUENCES_RGB",
    "SPLITS",
    "Camera",
    "field_of_view",
    "make_fundus_study",
    "render_fundus",
    "site_camera",
]
