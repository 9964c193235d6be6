"""A site's cases in the generator's working form: checked, cropped, fitted, mapped to the generator scale."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synthlearn.data.contract import LABEL_VALUES, CaseRecord
from synthlearn.data.preprocess import PreprocessConfig, brain_bbox, preprocess_case


from synthlearn.generators.ldm.config import GeneratorConfig

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class SiteTensors:
    """A site's cases in the generator's working form.

    Attributes:
        x: ``(N, C, *shape)`` float32: sequences in the generator scale and the whole-tumour mask (C = 5), and the
            brain mask (C = 6, ``background = "filled"``; the sequences' background then holds the nearest brain
            voxel's value, :func:`fill_background`).
        class_index: ``(N,)`` long, the class of each case, -1 when unknown.
        voxel_size: median voxel size (mm) of the case grid after cropping and fitting.
        cases: the case records (never written to the artifact).
    """

    x: torch.Tensor
    class_index: torch.Tensor
    voxel_size: tuple[float, float, float]
    cases: tuple[CaseRecord, ...]


def open_site(site_dir: str | Path, cfg: GeneratorConfig,
              case_ids: Sequence[str] | None = None) -> tuple[CaseRecord, ...]:
    """Check that ``site_dir`` is one clean site with segmentations and labels for ``cfg.label``.

    Reads every array (``verify_study``) and raises before anything is written. With ``case_ids``, only
    those cases are returned (e.g. a site that keeps some cases out of generator training as the
    non-members of a privacy audit); an id that is not in the site is an error.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a single site, problems found (each listed with file, expected, found), no
            segmentation, or no case labelled for ``cfg.label``.
    """
    from synthlearn.data.layouts import open_study
    from synthlearn.data.verify import verify_study

    site_dir = Path(site_dir)
    study = open_study(site_dir)
    if len(study.sites) != 1:
        raise ValueError(f"{site_dir}: expected one site folder (case folders + labels.csv), found a study with "
                         f"{len(study.sites)} sites {[s.name for s in study.sites]}; pass one site's folder")
    report = verify_study(site_dir, progress=False)
    if report.problems:
        lines = "\n  ".join(str(p) for p in report.problems[:30])
        more = f"\n  ... and {len(report.problems) - 30} more" if len(report.problems) > 30 else ""
        raise ValueError(f"{site_dir}: {len(report.problems)} problem(s) in the site data:\n  {lines}{more}")
    cases = study.sites[0].cases
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = sorted(wanted - {c.case_id for c in cases})
        if unknown:
            raise ValueError(f"{site_dir}: case_ids not in the site: {unknown[:10]}")
        cases = tuple(c for c in cases if c.case_id in wanted)
    if not cases:
        raise ValueError(f"{site_dir}: expected case folders, found none")
    no_seg = [c.case_id for c in cases if c.seg is None or not Path(c.seg).is_file()]
    if no_seg:
        raise ValueError(f"{site_dir}: the generator needs a segmentation (seg.nii.gz) in every case; missing in "
                         f"{no_seg[:10]}")
    labelled = [c for c in cases if c.labels.get(cfg.label) is not None]
    if not labelled:
        raise ValueError(f"{site_dir / 'labels.csv'}: expected {cfg.label} labels "
                         f"({'/'.join(LABEL_VALUES[cfg.label])}) for at least one case, found none")
    return cases


def load_site_tensors(cases: tuple[CaseRecord, ...], cfg: GeneratorConfig) -> SiteTensors:
    """Read, crop and fit every case, map intensities to the generator scale, stack with the tumour mask.

    Each sequence is z-scored over the brain at the case's own resolution *before* it is fitted to
    ``cfg.shape``, exactly as the task models' preprocessing does (:func:`synthlearn.data.preprocess.preprocess_case`),
    and only then mapped to the generator scale (an affine map inside the brain). Fitting raw intensities
    instead blends the brain's edge with the zero background into a dark rim that lowers the brain mean and
    widens its spread: on the default phantom that took the tumour-to-brain contrast a task model sees from
    -0.74 to -0.18 SD in T1 (sign flipped for some wildtype cases) and from 2.5 to 1.6 SD in T2, i.e. the
    generator learnt a class signal weaker than, and different from, the real one (docs/benchmarks.md).
    """
    from synthlearn.data.io import read_case, voxel_spacing
    from synthlearn.synthesis.cases import generator_intensities

    pre = PreprocessConfig(shape=cfg.shape, mode=cfg.fit_mode, crop=True, zscore=True)
    xs, classes, sizes = [], [], []
    names = cfg.class_names
    for case in cases:
        arrays = read_case(case)
        box = brain_bbox(arrays.images)
        cropped = [b.stop - b.start for b in box]
        images, seg = preprocess_case(arrays.images, arrays.seg, pre)
        spacing = voxel_spacing(arrays.affine)
        if cfg.fit_mode == "fit":
            scale = min(1.0, *(w / h for w, h in zip(cfg.shape, cropped)))
            spacing = spacing / scale
        elif cfg.fit_mode == "resize":
            spacing = spacing * np.asarray(cropped) / np.asarray(cfg.shape)
        sizes.append(spacing)
        mask = (seg > 0).astype(np.float32)[None]
        scaled = generator_intensities(images)
        if cfg.background == "filled":
            brain = (scaled > 0).any(axis=0)
            xs.append(np.concatenate([fill_background(scaled, brain), mask, brain.astype(np.float32)[None]], axis=0))
        else:
            xs.append(np.concatenate([scaled, mask], axis=0))
        value = case.labels.get(cfg.label)
        classes.append(names.index(value) if value is not None else -1)
    voxel = tuple(float(v) for v in np.median(np.stack(sizes), axis=0))
    return SiteTensors(x=torch.from_numpy(np.stack(xs)), class_index=torch.tensor(classes, dtype=torch.long),
                       voxel_size=voxel, cases=tuple(cases))  # type: ignore[arg-type]


def fill_background(images: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``(C, X, Y, Z)`` images with every voxel outside ``brain`` ``(X, Y, Z)`` set to the value of its nearest brain
    voxel (Euclidean distance transform): the brain's edge no longer steps to 0. Unchanged without any brain voxel."""
    from scipy import ndimage

    if not brain.any() or brain.all():
        return images.copy()
    idx = ndimage.distance_transform_edt(~brain, return_distances=False, return_indices=True)
    return images[:, idx[0], idx[1], idx[2]].astype(images.dtype)


