"""A 2D histology phantom of four "organs" with nuclei masks (AsynDGAN's nuclei task, paper 003 section 4.5;
PHANTOM.md): H&E-stained tiles written as a 2D study of the data contract.

Each tile: random non-touching ellipse nuclei (one instance each, at least one background pixel apart, so the
connected components of the mask are the instances) -> haematoxylin optical density (dense in nuclei with
chromatin texture, some nuclei pale, faint elsewhere; blurred) and eosin (smooth cytoplasm/stroma texture with dense
dark strands that are not nuclei) -> RGB by
``skimage.color.hed2rgb``. Organs differ by nucleus size, density, elongation and chromatin; every site (an
organ's hospital) has its own stain strength (H and E scale) and white balance.

A study holds one training site per organ (``breast``, ``liver``, ``kidney``, ``prostate``) and one test site per
organ (``<organ>_test``); sequences ``r``, ``g``, ``b`` (reflectance in [0, 1]); segmentation 1 in nuclei, 0
elsewhere; one label column ``organ``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from synthlearn.data.contract import Labels, LabelSchema
from synthlearn.data.io import atomic_write_text, write_case, write_labels_csv
from synthlearn.data.layouts import write_study_json

SEQUENCES_RGB: tuple[str, ...] = ("r", "g", "b")
#: nucleus label in the segmentation
NUCLEUS = 1


@dataclasses.dataclass(frozen=True)
class Organ:
    """How an organ's nuclei look.

    Attributes:
        radius: mean semi-axis (pixels) and its spread (SD).
        elongation: ratio of the long to the short axis (mean).
        density: nuclei per 64x64 pixels.
        chromatin: haematoxylin density of the nuclei (mean optical density).
    """

    radius: tuple[float, float]
    elongation: float
    density: float
    chromatin: float


ORGANS: dict[str, Organ] = {
    "breast": Organ(radius=(3.6, 0.7), elongation=1.3, density=22, chromatin=0.16),
    "liver": Organ(radius=(3.0, 0.4), elongation=1.1, density=12, chromatin=0.13),
    "kidney": Organ(radius=(2.2, 0.4), elongation=1.2, density=30, chromatin=0.18),
    "prostate": Organ(radius=(2.6, 0.5), elongation=2.0, density=18, chromatin=0.15),
}
#: presets: (tile side, training tiles per organ, test tiles per organ)
NUCLEI_PRESETS: dict[str, tuple[int, int, int]] = {"nuclei": (64, 24, 12), "tiny-nuclei": (32, 4, 2)}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def nuclei_mask(rng: np.random.Generator, organ: Organ, side: int) -> np.ndarray:
    """``(side, side)`` int32 instance map (0 background, 1..n nuclei), no two nuclei touching."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    out = np.zeros((side, side), np.int32)
    target = max(1, round(organ.density * (side / 64) ** 2 * rng.uniform(0.8, 1.2)))
    placed, tries = 0, 0
    while placed < target and tries < target * 40:
        tries += 1
        b = max(1.2, rng.normal(*organ.radius))
        a = b * max(1.0, rng.normal(organ.elongation, 0.15))
        cy, cx, th = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        if inside.sum() < 4:
            continue
        grown = ((u / (a + 1.5)) ** 2 + (v / (b + 1.5)) ** 2) <= 1.0  # keep a background gap to others
        if (out[grown] > 0).any():
            continue
        placed += 1
        out[inside] = placed
    return out


def render_tile(rng: np.random.Generator, organ: Organ, side: int, stain: tuple[float, float, float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """One H&E tile: ``(3, side, side)`` float32 RGB in [0, 1] and ``(side, side)`` uint8 nuclei mask."""
    from scipy import ndimage
    from skimage.color import hed2rgb

    instances = nuclei_mask(rng, organ, side)
    nuclei = instances > 0
    h_scale, e_scale, warmth = stain
    chromatin = organ.chromatin * (1 + 0.25 * _smooth_noise(rng, (side, side), 0.8))
    per_nucleus = rng.uniform(0.45, 1.2, size=instances.max() + 1)  # some nuclei pale (hard to segment)
    h = np.where(nuclei, chromatin * per_nucleus[instances], 0.015 + 0.005 * _smooth_noise(rng, (side, side), 3))
    h = ndimage.gaussian_filter(h, 0.6)  # optical blur: soft nucleus edges
    e = 0.05 * (1 + 0.35 * _smooth_noise(rng, (side, side), 2.5))
    fibres = _smooth_noise(rng, (side, side), 1.0)
    e = e + 0.10 * np.clip(fibres - 1.6, 0, None)  # dense eosinophilic strands: dark, but not nuclei
    hed = np.stack([np.clip(h * h_scale, 0, None), np.clip(e * e_scale, 0, None), np.zeros_like(h)], axis=-1)
    rgb = hed2rgb(hed)
    rgb = rgb * np.array([1.0, 1.0 - 0.5 * warmth, 1.0 - warmth])  # the site's white balance
    rgb = np.clip(rgb + rng.normal(0, 0.01, rgb.shape), 1e-3, 1.0)  # never exactly 0: the tile is all "brain"
    return np.moveaxis(rgb, -1, 0).astype(np.float32), nuclei.astype(np.uint8)


def make_nuclei_study(out: str | Path, preset: str = "nuclei", *, cases_per_site: int | None = None, seed: int = 0,
                      progress: bool = True) -> Path:
    """Write the nuclei phantom study (module docstring) to ``out`` (new or empty).

    Raises:
        ValueError: unknown preset or ``cases_per_site`` < 1.
        FileExistsError: ``out`` is not empty.
    """
    from tqdm.auto import tqdm

    if preset not in NUCLEI_PRESETS:
        raise ValueError(f"preset must be one of {list(NUCLEI_PRESETS)}, found {preset!r}")
    side, n_train, n_test = NUCLEI_PRESETS[preset]
    if cases_per_site is not None:
        if cases_per_site < 1:
            raise ValueError(f"cases_per_site must be >= 1, found {cases_per_site}")
        n_train, n_test = cases_per_site, max(1, cases_per_site // 2)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the nuclei phantom is written into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])  # 0.5 um pixels, in the contract's mm slots
    sites = {}
    bar = tqdm(total=len(ORGANS) * (n_train + n_test), desc=f"phantom {preset}", unit="tile", disable=not progress)
    for k, (name, organ) in enumerate(ORGANS.items()):
        for role, n, site in (("train", n_train, name), ("test", n_test, f"{name}_test")):
            rng = np.random.default_rng([seed, k, 0 if role == "train" else 1])
            stain = (rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25), rng.uniform(0.0, 0.08))
            rows = []
            for i in range(n):
                images, seg = render_tile(rng, organ, side, stain)
                case_id = f"{site}_{i:03d}"
                write_case(out / site, case_id, images, seg, affine, SEQUENCES_RGB)
                rows.append((case_id, Labels({"organ": name})))
                bar.update(1)
            write_labels_csv(out / site / "labels.csv", rows, ("organ",))
            sites[site] = role
    bar.close()
    atomic_write_text(out / "nuclei_phantom.json", json.dumps(
        {"generator": "synthlearn.data.phantom.nuclei", "preset": preset, "seed": seed, "tile": side,
         "organs": {n: dataclasses.asdict(o) for n, o in ORGANS.items()}}, indent=2) + "\n")
    write_study_json(out, sites, sequences=SEQUENCES_RGB, labels=LabelSchema((("organ", tuple(ORGANS)),)))
    return out


__all__ = [
    "NUCLEI_PRESETS",
    "NUCLEUS",
    "ORGANS",
    "SEQUENCES_RGB",
    "Organ",
    "make_nuclei_study",
    "nuclei_mask",
    "render_tile",
]
