"""Generating phantom cases and writing a phantom study in the data contract.

Randomness comes only from generators seeded by ``(seed, site, case index, stream)``, so a case's bytes do
not depend on progress bars, on the order cases are made in, or on the other sites of a study:

* stream 0 (numpy): labels, phenotype and tumour centre (the case *design*; cheap, no images);
* stream 1 (numpy): anatomy, tissue means and scanner parameters;
* stream 2 (torch): elastic field, shape/texture noise and image noise.

Which tumour type each case of a site gets is fixed by the site's class mix (largest-remainder counts)
and a permutation seeded by ``(seed, site)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synthlearn.data.contract import SEQUENCES, Labels
from synthlearn.data.io import atomic_write_text, write_case, write_labels_csv
from synthlearn.data.layouts import write_study_json
from synthlearn.data.phantom.anatomy import random_subject_transform, voxel_coords_mm, warp_atlas
from synthlearn.data.phantom.atlas import Atlas, load_atlas
from synthlearn.data.phantom.contrasts import case_means, render_contrasts, scanner_effects, skull_strip_and_scale
from synthlearn.data.phantom.sites import (
    PRESETS,
    STUDY_PRESETS,
    TUMOUR_TYPES,
    SitePreset,
    allocate_classes,
    site_preset,
)
from synthlearn.data.phantom.tumour import (
    Phenotype,
    compose_pv,
    draw_labels,
    draw_phenotype,
    place_tumour,
    segmentation,
    tumour_fractions,
)

log = logging.getLogger(__name__)

#: Bump when the output of a given seed changes (recorded in ``phantom.json``; resuming needs a match).
PHANTOM_VERSION = 1
#: Marker written first into a phantom study folder; its presence makes the folder safe to regenerate.
MARKER = "phantom.json"
MIN_SIZE = 16


@dataclasses.dataclass(frozen=True)
class PhantomCase:
    """One phantom case in memory.

    Attributes:
        case_id: ``<site>_<index:03d>``.
        site: site name.
        images: ``(4, X, Y, Z)`` float32, :data:`~synthlearn.data.contract.SEQUENCES` order, skull-stripped
            (0 outside the brain), each divided by its 99.5th percentile inside the brain.
        seg: ``(X, Y, Z)`` int8, 0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing.
        affine: ``(4, 4)`` voxel-to-mm RAS affine (MNI-aligned, voxel size ``192 mm / shape``).
        labels: the five labels.
        phenotype: the imaging ground truth (look, location, mismatch sign, calcifications, ...).
    """

    case_id: str
    site: str
    images: np.ndarray
    seg: np.ndarray
    affine: np.ndarray
    labels: Labels
    phenotype: Phenotype


def parse_shape(shape: int | Sequence[int] | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """``shape`` as three ints (an int means a cube); None gives ``default``.

    Raises:
        TypeError: not an int or a sequence of three ints.
        ValueError: an edge smaller than 16.
    """
    if shape is None:
        return default
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        out = (int(shape),) * 3
    elif isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        out = tuple(int(s) for s in shape)
    else:
        raise TypeError(f"shape must be an int (cube) or three ints like (128, 192, 192), found {shape!r}")
    if min(out) < MIN_SIZE:
        raise ValueError(f"shape must be at least {MIN_SIZE} voxels along every axis, found {out}")
    return out  # type: ignore[return-value]


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, found {seed!r}")
    return int(seed)


def _site_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, site: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _site_key(site), index, stream]))


def _torch_gen(seed: int, site: str, index: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, _site_key(site), index, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def site_tumour_types(site: SitePreset, n_cases: int, seed: int = 0) -> list[str]:
    """Tumour type of each case of a site: the class mix as counts, in a ``(seed, site)``-seeded order."""
    counts = allocate_classes(site.class_mix, n_cases)
    types = [t for t, c in zip(TUMOUR_TYPES, counts) for _ in range(c)]
    perm = np.random.default_rng(np.random.SeedSequence([seed, _site_key(site.name), 2**31 - 1])).permutation(n_cases)
    return [types[i] for i in perm]


def case_design(site: SitePreset, index: int, seed: int, atlas: Atlas,
                tumor_type: str | None = None) -> tuple[Labels, Phenotype]:
    """Labels and tumour phenotype (with its MNI centre) of a case, without making images (a few ms).

    Args:
        site: the site.
        index: case index within the site.
        seed: study seed.
        atlas: atlas of the working grid (placement rules).
        tumor_type: the case's tumour type; None draws it from the site's class mix.

    Returns:
        ``(labels, phenotype)``.
    """
    rng = _rng(seed, site.name, index, 0)
    if tumor_type is None:
        mix = np.asarray(site.class_mix, dtype=np.float64)
        tumor_type = str(rng.choice(TUMOUR_TYPES, p=mix / mix.sum()))
    labels = draw_labels(tumor_type, rng)
    phenotype = draw_phenotype(labels, rng, site.size_scale)
    centre = place_tumour(atlas, phenotype, rng)
    return labels, dataclasses.replace(phenotype, centre_mni=tuple(float(v) for v in centre))


def generate_case(
    site: str | SitePreset,
    index: int,
    *,
    seed: int = 0,
    shape: int | Sequence[int] = 64,
    tumor_type: str | None = None,
    atlas: Atlas | None = None,
    timings: dict[str, float] | None = None,
) -> PhantomCase:
    """Make one phantom case in memory.

    Args:
        site: a site name (see :mod:`synthlearn.data.phantom.sites`) or a :class:`SitePreset`.
        index: case index within the site (part of the seed and of the case id).
        seed: study seed; the same ``(seed, site, index, tumor_type, shape)`` gives the same arrays.
        shape: working grid, an int (cube) or ``(X, Y, Z)``; always spans a 192 mm cube (64 -> 3 mm).
        tumor_type: ``glioblastoma`` / ``astrocytoma`` / ``oligodendroglioma``; None draws it from the
            site's class mix.
        atlas: the atlas for ``shape`` (loaded from the cache when None; pass it when making many cases).
        timings: if given, filled with seconds per stage (anatomy, warp, tumour, contrasts, scanner, finish).

    Returns:
        The :class:`PhantomCase`.
    """
    site_p = site_preset(site) if isinstance(site, str) else site
    seed = _check_seed(seed)
    grid = parse_shape(shape, (64, 64, 64))
    if atlas is None:
        atlas = load_atlas(grid)
    elif atlas.shape != grid:
        raise ValueError(f"atlas shape {atlas.shape} does not match shape {grid}")
    clock = [time.perf_counter()]

    def tick(stage: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    labels, phen = case_design(site_p, index, seed, atlas, tumor_type)
    rng = _rng(seed, site_p.name, index, 1)
    gen = _torch_gen(seed, site_p.name, index, 2)
    with torch.no_grad():
        transform = random_subject_transform(atlas, rng, gen)
        coords = voxel_coords_mm(atlas.affine, grid)
        centre = transform.from_atlas(np.asarray(phen.centre_mni))
        tick("anatomy")
        tissue = warp_atlas(atlas, transform, coords, centre, phen.radius_mm, phen.mass_strength)
        tick("warp")
        fractions, hetero = tumour_fractions(phen, centre, coords, tissue, gen, rng)
        # drop vanishing tails so that results do not depend on denormal handling
        fractions = torch.where(fractions < 1e-6, torch.zeros_like(fractions), fractions)
        pv = compose_pv(tissue, fractions)
        brain = tissue[0] < 0.5
        seg = segmentation(fractions, brain)
        tick("tumour")
        images = render_contrasts(pv, case_means(site_p.scanner, phen, rng), hetero, gen)
        tick("contrasts")
        images = scanner_effects(images, atlas.affine, site_p.scanner, rng, gen)
        tick("scanner")
        arr = skull_strip_and_scale(images, brain)
        tick("finish")
    return PhantomCase(case_id=f"{site_p.name}_{index:03d}", site=site_p.name, images=arr,
                       seg=seg.numpy().astype(np.int8), affine=atlas.affine.copy(), labels=labels, phenotype=phen)


#: a 2D slice with fewer tumour pixels is dropped (AsynDGAN's BraTS setting)
MIN_SLICE_TUMOUR_PIXELS = 10


def largest_tumour_slice2d(images: np.ndarray, seg: np.ndarray, affine: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The axial (last-axis) slice of a ``(C, X, Y, Z)`` case with the largest tumour area: ``(images (C, X, Y),
    seg (X, Y), affine of the slice (4, 4), its tumour pixels)``."""
    z = int(np.argmax((seg > 0).sum(axis=(0, 1))))
    shift = np.eye(4)
    shift[2, 3] = z
    return images[..., z], seg[..., z], np.asarray(affine, dtype=float) @ shift, int((seg[..., z] > 0).sum())


def _case_complete(case_dir: Path) -> bool:
    return all((case_dir / f"{name}.nii.gz").is_file() for name in (*SEQUENCES, "seg"))


def _prepare_output(out: Path, config: dict, replace: bool = False) -> bool:
    """Check the output folder and, with ``replace``, clear a previous phantom study there. Returns True when the
    folder holds an unfinished or finished study made with the same config (complete cases are then kept).

    Raises:
        FileExistsError: ``out`` is a file, a non-empty folder that is not a phantom study, or a phantom study made
            with other arguments while ``replace`` is False (nothing is written or removed).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a new or empty folder (or an earlier phantom study)")
    if not out.exists() or not any(out.iterdir()):
        return False
    marker = out / MARKER
    old = None
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
    if not isinstance(old, dict) or old.get("generator") != "synthlearn.data.phantom":
        raise FileExistsError(
            f"--out {out} is not empty and is not a synthlearn phantom study (no {MARKER} written by "
            f"make-phantoms); found {sorted(p.name for p in out.iterdir())[:8]}. Choose a new or empty folder; "
            f"nothing was written."
        )
    if old.get("config") != config and not replace:
        theirs = old.get("config", {})
        diff = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
        raise FileExistsError(
            f"--out {out} holds a phantom study made with other arguments (differing: {', '.join(diff)}); "
            f"choose a new or empty folder, or pass --replace to overwrite it. Nothing was written.")
    (out / "study.json").unlink(missing_ok=True)  # the study is invalid until it is complete again
    if old.get("config") == config:
        log.info("resuming the phantom study in %s (same config)", out)
        return True
    log.info("replacing the earlier phantom study in %s (--replace)", out)
    for name in old.get("config", {}).get("sites", []):
        site_dir = out / str(name)
        if isinstance(name, str) and "/" not in name and name not in ("", ".", "..") and site_dir.is_dir():
            shutil.rmtree(site_dir)
    return False


def make_phantom_study(
    out: str | Path,
    preset: str = "paper",
    cases_per_site: int | None = None,
    shape: int | Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    replace: bool = False,
) -> Path:
    """Write a multi-site phantom study in the data contract (``study.json``, per-site ``labels.csv``,
    ``<site>/<case_id>/{t1,t1c,t2,flair,seg}.nii.gz``) plus ``phantom.json`` (config and per-case ground
    truth).

    ``study.json`` is written last, so a killed run never leaves a study pointing at missing cases; running
    again with the same arguments resumes (complete cases are kept: same seed, same bytes). An earlier
    phantom study in ``out`` made with other arguments is refused, or replaced with ``replace``.

    Args:
        out: output folder: new, empty, or an unfinished phantom study with the same arguments (it resumes).
        preset: ``paper`` (train tcga, utsw, egd; test nyu, uwm, ucsf, upenn, utswp2; 48 cases per site;
            64^3 at 3 mm), ``tiny`` (3 train + 2 test sites, 6 cases per site, 32^3), or ``slices2d`` /
            ``tiny-slices2d``: the same studies as 2D images, each case's axial slice through its largest tumour
            area (a case whose slice holds fewer than 10 tumour pixels is left out).
        cases_per_site: cases per site (None = the preset's default).
        shape: working grid, an int (cube) or three ints (e.g. 128 or (128, 192, 192)); it always spans a
            192 mm cube. None = the preset's default.
        seed: study seed (non-negative int).
        progress: show a tqdm progress bar over cases.
        replace: overwrite an earlier phantom study in ``out`` made with other arguments.

    Returns:
        The study folder.

    Raises:
        ValueError: unknown preset, ``cases_per_site`` < 1, a shape edge < 16, a negative seed.
        TypeError: ``shape`` or ``cases_per_site`` of the wrong type.
        FileExistsError: ``out`` is not empty and is not a phantom study of the same arguments (without
            ``replace``; nothing is written).
    """
    from tqdm.auto import tqdm

    if preset not in STUDY_PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, found {preset!r}")
    spec = STUDY_PRESETS[preset]
    if cases_per_site is None:
        n_cases = spec.cases_per_site
    elif isinstance(cases_per_site, (int, np.integer)) and not isinstance(cases_per_site, bool):
        n_cases = int(cases_per_site)
        if n_cases < 1:
            raise ValueError(f"cases_per_site must be >= 1, found {cases_per_site}")
    else:
        raise TypeError(f"cases_per_site must be an int >= 1 or None, found {cases_per_site!r}")
    grid = parse_shape(shape, spec.shape)
    seed = _check_seed(seed)
    out = Path(out)
    config = {"preset": preset, "seed": seed, "shape": list(grid), "cases_per_site": n_cases,
              "version": PHANTOM_VERSION, "sites": [s.name for s in spec.sites]}
    resume = _prepare_output(out, config, replace)

    out.mkdir(parents=True, exist_ok=True)
    marker = {"generator": "synthlearn.data.phantom", "complete": False, "config": config,
              "sites": {s.name: {"role": s.role, "class_mix": dict(zip(TUMOUR_TYPES, s.class_mix)),
                                 "size_scale": s.size_scale, "scanner": s.scanner.description}
                        for s in spec.sites}}
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # data generation is ~4x slower with 2 threads (oversubscription)
    try:
        atlas = load_atlas(grid)
        cases_meta: dict[str, dict] = {}
        bar = tqdm(total=len(spec.sites) * n_cases, desc=f"phantom {preset}", unit="case", disable=not progress)
        for site in spec.sites:
            types = site_tumour_types(site, n_cases, seed)
            rows = []
            for index, ttype in enumerate(types):
                case_id = f"{site.name}_{index:03d}"
                case_dir = out / site.name / case_id
                if resume and _case_complete(case_dir):
                    labels, phen = case_design(site, index, seed, atlas, ttype)
                else:
                    case = generate_case(site, index, seed=seed, shape=grid, tumor_type=ttype, atlas=atlas)
                    images, seg, affine = case.images, case.seg, case.affine
                    if spec.slices2d:
                        images, seg, affine, pixels = largest_tumour_slice2d(images, seg, affine)
                        if pixels < MIN_SLICE_TUMOUR_PIXELS:
                            log.info("%s: its largest tumour slice holds %d pixels (< %d): left out", case_id,
                                     pixels, MIN_SLICE_TUMOUR_PIXELS)
                            bar.update(1)
                            continue
                    write_case(out / site.name, case.case_id, images, seg, affine)
                    labels, phen = case.labels, case.phenotype
                rows.append((case_id, labels))
                cases_meta[case_id] = {"site": site.name, **labels.as_row(), **phen.summary()}
                bar.update(1)
            write_labels_csv(out / site.name / "labels.csv", rows)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    marker["complete"] = True
    marker["cases"] = cases_meta
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2) + "\n")
    write_study_json(out, {s.name: s.role for s in spec.sites})  # last: the study is now complete
    log.info("phantom study (%s, %d sites x %d cases, %s%s) written to %s", preset, len(spec.sites), n_cases,
             "x".join(map(str, grid)), ": axial slices through the largest tumour" if spec.slices2d else "", out)
    return out
