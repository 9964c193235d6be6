"""Radiomics features of a region (whole tumour or whole brain) per case and sequence, with pyradiomics.

Used by the CATphishing diversity filter (:mod:`synthlearn.synthesis.diversity`, whole-tumour features of
every synthetic case, paper 000 "Methods": radiomics features of the whole tumour, ref. 49) and by the
default feature extractor of the Frechet distance (:mod:`synthlearn.audits.fidelity`, a Frechet
Radiomics Distance: no pretrained network, so nothing to download).

Settings and why:

* ``binCount`` (default 32) rather than pyradiomics' default ``binWidth=25``: synthlearn's images are
  z-scored (or divided by a percentile), where a bin width of 25 would put every voxel into one bin.
* First-order and GLCM features are computed per sequence; shape features depend on the mask only and
  are computed once per case (``shape_*`` columns), not once per sequence.
* pyradiomics' own logging is set to ERROR while features are computed (it is chatty at INFO/WARNING).

Tiny and empty masks: pyradiomics refuses an empty mask, a single voxel, or a mask that is flat in two
dimensions. A region with fewer than ``min_voxels`` voxels, or one pyradiomics refuses, gives a row of
NaN with ``on_small="nan"`` (the default; a warning names the case) or a ``ValueError`` with
``on_small="raise"``. Callers drop NaN rows (the diversity filter reports them as ``failed``, the
Frechet distance leaves them out and counts them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from synthlearn.data.contract import SEQUENCES, CaseRecord
from synthlearn.data.io import CaseArrays, read_case
from synthlearn.data.io import voxel_spacing as _data_voxel_spacing
from synthlearn.data.preprocess import PreprocessConfig, preprocess_case

log = logging.getLogger(__name__)

#: Feature classes computed on the intensities of one sequence (shape is handled apart).
INTENSITY_CLASSES: tuple[str, ...] = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
#: Every feature class this module accepts.
FEATURE_CLASSES: tuple[str, ...] = ("shape", *INTENSITY_CLASSES)
REGIONS: tuple[str, ...] = ("tumour", "brain")


@dataclasses.dataclass(frozen=True)
class RadiomicsSettings:
    """pyradiomics settings used by synthlearn.

    Attributes:
        feature_classes: pyradiomics feature classes, from :data:`FEATURE_CLASSES`
            (default first-order + shape + GLCM, the set ENVIRONMENT.md timed at 0.04 s per 32^3 image).
        bin_count: number of grey-level bins (fixed bin count; see the module docstring).
        min_voxels: regions with fewer voxels give NaN (or raise, see ``on_small``).
        on_small: ``"nan"`` (NaN row + warning) or ``"raise"`` (``ValueError``) for a region that is too
            small or that pyradiomics refuses.
    """

    feature_classes: tuple[str, ...] = ("firstorder", "shape", "glcm")
    bin_count: int = 32
    min_voxels: int = 8
    on_small: Literal["nan", "raise"] = "nan"

    def __post_init__(self) -> None:
        bad = [c for c in self.feature_classes if c not in FEATURE_CLASSES]
        if bad or not self.feature_classes:
            raise ValueError(f"feature_classes must be a non-empty subset of {FEATURE_CLASSES}, "
                             f"found {self.feature_classes}")
        if len(set(self.feature_classes)) != len(self.feature_classes):
            raise ValueError(f"feature_classes has duplicates: {self.feature_classes}")
        if int(self.bin_count) < 2:
            raise ValueError(f"bin_count must be >= 2, found {self.bin_count}")
        if int(self.min_voxels) < 2:
            raise ValueError(f"min_voxels must be >= 2 (pyradiomics refuses one voxel), found {self.min_voxels}")
        if self.on_small not in ("nan", "raise"):
            raise ValueError(f"on_small must be 'nan' or 'raise', found {self.on_small!r}")

    @property
    def intensity_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.feature_classes if c != "shape")

    @property
    def with_shape(self) -> bool:
        return "shape" in self.feature_classes


class SmallRegionError(ValueError):
    """A region too small for radiomics (empty, fewer than ``min_voxels``, or refused by pyradiomics)."""


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes of a ``(4, 4)`` affine, as SimpleITK takes it
    (:func:`synthlearn.data.io.voxel_spacing`, refusing a zero-length axis)."""
    spacing = _data_voxel_spacing(affine)
    if not np.all(spacing > 0):
        raise ValueError(f"affine has a zero-length axis; spacing {spacing.tolist()}")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def region_mask(images: np.ndarray, seg: np.ndarray | None, region: str) -> np.ndarray:
    """The voxels features are computed on.

    Args:
        images: ``(C, X, Y, Z)``; the brain is where any sequence is non-zero (skull-stripped data).
        seg: ``(X, Y, Z)`` segmentation (contract values) or None.
        region: ``"tumour"`` (whole tumour, ``seg > 0``) or ``"brain"``.

    Returns:
        ``(X, Y, Z)`` bool.
    """
    if region == "tumour":
        if seg is None:
            raise ValueError("region 'tumour' needs a segmentation; found a case without seg")
        return np.asarray(seg) > 0
    elif region == "brain":
        return np.any(np.asarray(images) != 0, axis=0)
    else:
        raise ValueError(f"region must be one of {REGIONS}, found {region!r}")


def read_case_arrays(case: CaseRecord | CaseArrays, preprocess: PreprocessConfig | None = None) -> CaseArrays:
    """A case in memory: reads a :class:`CaseRecord` from disk, passes :class:`CaseArrays` through, and
    applies :func:`synthlearn.data.preprocess.preprocess_case` when ``preprocess`` is given (the affine is
    then kept, so spacing stays the case's own)."""
    if isinstance(case, CaseRecord):
        arrays = read_case(case)
    elif isinstance(case, CaseArrays):
        arrays = case
    else:
        raise TypeError(f"expected a CaseRecord or CaseArrays, found {type(case).__name__}")
    if arrays.images.ndim != 4:
        raise ValueError(f"case images must be (C, X, Y, Z), found shape {arrays.images.shape}")
    if preprocess is not None:
        images, seg = preprocess_case(arrays.images, arrays.seg, preprocess)
        arrays = CaseArrays(images=images, seg=seg, affine=arrays.affine)
    return arrays


def case_id_of(case: CaseRecord | CaseArrays, index: int, prefix: str = "case") -> str:
    """``site/case_id`` for a :class:`CaseRecord`, ``<prefix>-<index>`` for arrays without a name."""
    if isinstance(case, CaseRecord):
        return f"{case.site}/{case.case_id}" if case.site else case.case_id
    return f"{prefix}-{index:04d}"


def _quiet_radiomics():
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    return radiomics


def _sitk_image(array: np.ndarray, spacing: Sequence[float]):
    import SimpleITK as sitk

    # numpy (X, Y, Z) -> SimpleITK wants (Z, Y, X) arrays and (x, y, z) spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _to_float(value) -> float:
    """A pyradiomics value as float; complex results (sqrt of a tiny negative eigenvalue of a degenerate
    mask in the shape class) keep their real part when the imaginary part is negligible, else NaN."""
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        c = complex(arr.reshape(-1)[0])
        return c.real if abs(c.imag) <= 1e-6 * max(1.0, abs(c.real)) else float("nan")
    return float(arr.reshape(-1)[0])


class RadiomicsExtractor:
    """pyradiomics feature extraction on numpy arrays (built once, reused for every case).

    Args:
        settings: the settings (default :class:`RadiomicsSettings`).

    Example::

        ext = RadiomicsExtractor()
        vec = ext.case_features(images, seg > 0, spacing=(1, 1, 1))   # (len(ext.case_feature_names()),)
    """

    def __init__(self, settings: RadiomicsSettings | None = None) -> None:
        self.settings = settings or RadiomicsSettings()
        radiomics = _quiet_radiomics()
        from radiomics import featureextractor

        classes = radiomics.getFeatureClasses()
        base = {"binCount": int(self.settings.bin_count), "additionalInfo": False, "label": 1}
        self._intensity = None
        self._intensity_names: list[tuple[str, str]] = []
        if self.settings.intensity_classes:
            self._intensity = featureextractor.RadiomicsFeatureExtractor(**base)
            self._intensity.disableAllFeatures()
            self._intensity.enableFeaturesByName(**{c: [] for c in self.settings.intensity_classes})
            for c in self.settings.intensity_classes:
                names = classes[c].getFeatureNames()
                self._intensity_names += [(c, n) for n in sorted(names) if not names[n]]
        self._shape = None
        self._shape_names: list[str] = []
        if self.settings.with_shape:
            self._shape = featureextractor.RadiomicsFeatureExtractor(**base)
            self._shape.disableAllFeatures()
            self._shape.enableFeaturesByName(shape=[])
            names = classes["shape"].getFeatureNames()
            self._shape_names = [n for n in sorted(names) if not names[n]]

    # names ------------------------------------------------------------------------------------------
    def intensity_feature_names(self) -> list[str]:
        """``<class>_<Feature>`` names of the per-sequence features, in output order."""
        return [f"{c}_{n}" for c, n in self._intensity_names]

    def shape_feature_names(self) -> list[str]:
        """``shape_<Feature>`` names (empty when shape is not enabled)."""
        return [f"shape_{n}" for n in self._shape_names]

    def case_feature_names(self, sequences: Sequence[str] = SEQUENCES) -> list[str]:
        """Names of :meth:`case_features`: shape first, then ``<sequence>_<class>_<Feature>`` per sequence."""
        return self.shape_feature_names() + [f"{s}_{n}" for s in sequences for n in self.intensity_feature_names()]

    # features ---------------------------------------------------------------------------------------
    def _check_mask(self, mask: np.ndarray, shape: tuple[int, ...], what: str) -> bool:
        if mask.shape != shape:
            raise ValueError(f"{what}: mask shape {mask.shape} differs from image shape {shape}")
        n = int(mask.sum())
        if n < self.settings.min_voxels:
            msg = f"{what}: region has {n} voxels; radiomics needs at least min_voxels={self.settings.min_voxels}"
            if self.settings.on_small == "raise":
                raise SmallRegionError(msg)
            log.warning("%s; its features are NaN", msg)
            return False
        return True

    def _execute(self, extractor, image, mask, what: str) -> dict | None:
        try:
            return extractor.execute(image, mask, label=1)
        except ValueError as exc:  # pyradiomics' refusal of a degenerate mask
            msg = f"{what}: pyradiomics refused the region ({exc})"
            if self.settings.on_small == "raise":
                raise SmallRegionError(msg) from exc
            log.warning("%s; its features are NaN", msg)
            return None

    def intensity_features(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           *, what: str = "image") -> np.ndarray:
        """Per-sequence features of one 3D image in a region.

        Args:
            image: ``(X, Y, Z)`` intensities.
            mask: ``(X, Y, Z)`` bool region.
            spacing: voxel size in mm along X, Y, Z.
            what: name used in warnings and errors (e.g. ``tcga/tcga_003 t1c``).

        Returns:
            ``(len(intensity_feature_names()),)`` float64; all NaN for a too-small region (``on_small="nan"``).
        """
        image = np.asarray(image, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if image.ndim != 3:
            raise ValueError(f"{what}: image must be (X, Y, Z), found shape {image.shape}")
        out = np.full(len(self._intensity_names), np.nan)
        if self._intensity is None or not self._check_mask(mask, image.shape, what):
            return out
        result = self._execute(self._intensity, _sitk_image(image, spacing),
                               _sitk_image(mask.astype(np.uint8), spacing), what)
        if result is None:
            return out
        for i, (c, n) in enumerate(self._intensity_names):
            out[i] = _to_float(result[f"original_{c}_{n}"])
        return out

    def shape_features(self, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), *,
                       what: str = "mask") -> np.ndarray:
        """Shape features of a ``(X, Y, Z)`` bool region; ``(len(shape_feature_names()),)`` float64."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3:
            raise ValueError(f"{what}: mask must be (X, Y, Z), found shape {mask.shape}")
        out = np.full(len(self._shape_names), np.nan)
        if self._shape is None or not self._check_mask(mask, mask.shape, what):
            return out
        m = _sitk_image(mask.astype(np.uint8), spacing)
        result = self._execute(self._shape, _sitk_image(mask.astype(np.float32), spacing), m, what)
        if result is None:
            return out
        for i, n in enumerate(self._shape_names):
            out[i] = _to_float(result[f"original_shape_{n}"])
        return out

    def case_features(self, images: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      *, sequences: Sequence[str] = SEQUENCES, what: str = "case") -> np.ndarray:
        """Shape features of the region then per-sequence features of every sequence.

        Args:
            images: ``(C, X, Y, Z)``, channels in ``sequences`` order.
            mask: ``(X, Y, Z)`` bool region.
            spacing: voxel size in mm.
            sequences: names of the channels (length C).
            what: name used in warnings and errors.

        Returns:
            ``(len(case_feature_names(sequences)),)`` float64 (all NaN for a too-small region).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[0] != len(sequences):
            raise ValueError(f"{what}: images must be ({len(sequences)}, X, Y, Z) for sequences {list(sequences)}, "
                             f"found shape {images.shape}")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != images.shape[1:]:
            raise ValueError(f"{what}: mask shape {mask.shape} differs from image shape {images.shape[1:]}")
        n_total = len(self.case_feature_names(sequences))
        if int(mask.sum()) < self.settings.min_voxels:
            self._check_mask(mask, mask.shape, what)  # warns or raises
            return np.full(n_total, np.nan)
        parts = [self.shape_features(mask, spacing, what=what)]
        for i, seq in enumerate(sequences):
            parts.append(self.intensity_features(images[i], mask, spacing, what=f"{what} {seq}"))
        if any(p.size and np.isnan(p).all() for p in parts):
            return np.full(n_total, np.nan)  # one refused part makes the whole row unusable
        return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class RadiomicsMatrix:
    """Features of a set of cases.

    Attributes:
        features: ``(N, F)`` float64; a row of NaN for a case whose region was too small.
        names: the F feature names.
        case_ids: the N case ids (``site/case_id``).
        region: ``tumour`` or ``brain``.
    """

    features: np.ndarray
    names: tuple[str, ...]
    case_ids: tuple[str, ...]
    region: str

    @property
    def valid(self) -> np.ndarray:
        """``(N,)`` bool: rows without NaN."""
        return ~np.isnan(self.features).any(axis=1) if self.features.size else np.zeros(len(self.case_ids), bool)


def radiomics_matrix(
    cases: Sequence[CaseRecord | CaseArrays],
    *,
    region: str = "tumour",
    sequences: Sequence[str] = SEQUENCES,
    settings: RadiomicsSettings | None = None,
    preprocess: PreprocessConfig | None = None,
    case_ids: Sequence[str] | None = None,
    progress: bool = False,
) -> RadiomicsMatrix:
    """Radiomics features of the ``region`` of every case (shape once, intensity classes per sequence).

    Args:
        cases: cases on disk (read with :func:`~synthlearn.data.io.read_case`) or in memory; images in
            :data:`~synthlearn.data.contract.SEQUENCES` order.
        region: ``"tumour"`` (``seg > 0``) or ``"brain"`` (non-zero voxels).
        sequences: which sequences to compute intensity features on (subset of SEQUENCES).
        settings: pyradiomics settings.
        preprocess: optional preprocessing applied to every case first.
        case_ids: names of the cases (default ``site/case_id`` or ``case-<i>``).
        progress: show a progress bar.

    Returns:
        A :class:`RadiomicsMatrix` with ``features`` of shape ``(len(cases), F)``.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, found {region!r}")
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown or not sequences:
        raise ValueError(f"sequences must be a non-empty subset of {SEQUENCES}, found {list(sequences)}")
    if case_ids is not None and len(case_ids) != len(cases):
        raise ValueError(f"case_ids has {len(case_ids)} names for {len(cases)} cases")
    ext = RadiomicsExtractor(settings)
    names = ext.case_feature_names(sequences)
    idx = [SEQUENCES.index(s) for s in sequences]
    ids = list(case_ids) if case_ids is not None else [case_id_of(c, i) for i, c in enumerate(cases)]
    rows = np.full((len(cases), len(names)), np.nan)
    iterator = enumerate(cases)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(cases), desc=f"radiomics ({region})", leave=False)
    for i, case in iterator:
        arrays = read_case_arrays(case, preprocess)
        mask = region_mask(arrays.images, arrays.seg, region)
        rows[i] = ext.case_features(arrays.images[idx], mask, voxel_spacing(arrays.affine),
                                    sequences=sequences, what=ids[i])
    return RadiomicsMatrix(features=rows, names=tuple(names), case_ids=tuple(ids), region=region)
