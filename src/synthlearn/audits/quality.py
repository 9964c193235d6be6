"""No-reference image quality of real and synthetic cases (paper 000, Table 2).

BRISQUE (``brisque`` 0.2.0's SVM model, called through :class:`BrisqueModel`, which works around its numpy 2.4
``TypeError`` and its 3-channel input) and PIQE (``pypiqe``) on the mid-tumour axial slice of every case and sequence
(2D), windowed to 8 bits; mean +/- SD per site and sequence for real and synthetic cases.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from synthlearn.data.contract import SEQUENCES
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.evaluate.radiomics import (
    case_id_of,
)
from synthlearn.training.seeding import numpy_generator
from synthlearn.audits.fidelity import Case, check_sequences, prepare_case, sample_cases

log = logging.getLogger(__name__)


def mid_tumour_slice(seg: np.ndarray | None, images: np.ndarray) -> int:
    """Axial (last-axis) index through the tumour's centre (mean z of tumour voxels); the brain's centre
    slice when there is no tumour, the volume's centre when the volume is empty.

    Args:
        seg: ``(X, Y, Z)`` or None.
        images: ``(C, X, Y, Z)``.
    """
    if seg is not None and (np.asarray(seg) > 0).any():
        return int(np.floor(np.nonzero(np.asarray(seg) > 0)[2].mean() + 0.5))
    brain = np.any(np.asarray(images) != 0, axis=0)
    if brain.any():
        return int(np.floor(np.nonzero(brain)[2].mean() + 0.5))
    return images.shape[-1] // 2


def to_uint8(slice2d: np.ndarray) -> np.ndarray:
    """A 2D slice windowed to its brain's 0.5-99.5th percentiles as uint8 (background 0)."""
    img = np.asarray(slice2d, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected a 2D slice, found shape {img.shape}")
    brain = img != 0
    if not brain.any():
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(img[brain], [0.5, 99.5])
    out = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    out[~brain] = 0.0
    return np.round(out * 255).astype(np.uint8)


class BrisqueModel:
    """BRISQUE (Mittal et al. 2012) with the SVM model shipped in ``brisque`` 0.2.0.

    Works around two problems of that package without editing it: its ``scale_features`` calls ``float()``
    on 1-element arrays (a ``TypeError`` under numpy 2.4), and ``score`` wants a colour image. Here the
    features of a grey image (and of its half-size copy) are flattened to 36 floats and scaled and scored
    exactly as the package does; for a grey image ``g`` the result equals the package's ``score`` on the
    3-channel image ``stack([g, g, g])`` once its scaling is fixed.
    """

    def __init__(self) -> None:
        from brisque import BRISQUE

        self._impl = BRISQUE(url=False)
        params = self._impl.scale_params
        self._min = np.asarray([float(np.ravel(v)[0]) for v in params["min_"]], dtype=np.float64)
        self._max = np.asarray([float(np.ravel(v)[0]) for v in params["max_"]], dtype=np.float64)

    def features(self, image: np.ndarray) -> np.ndarray:
        """``(36,)`` BRISQUE features of a grey ``(H, W)`` uint8 image (or float in [0, 1])."""
        import cv2

        img = np.asarray(image)
        if img.ndim != 2:
            raise ValueError(f"BRISQUE expects a grey (H, W) image, found shape {img.shape}")
        gray = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
        full = self._impl.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6)
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        down = self._impl.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)
        return np.concatenate([np.ravel(np.asarray(f, dtype=np.float64)) for f in (*full, *down)])

    def score(self, image: np.ndarray) -> float:
        """BRISQUE score (lower = better quality) of a grey ``(H, W)`` image."""
        from libsvm import svmutil

        feats = self.features(image)
        scaled = -1.0 + 2.0 / (self._max - self._min) * (feats - self._min)
        x, _ = svmutil.gen_svm_nodearray([float(v) for v in scaled], isKernel=False)
        prob = (svmutil.c_double * 1)()
        return float(svmutil.libsvm.svm_predict_probability(self._impl.model, x, prob))


def piqe_score(image: np.ndarray) -> float:
    """PIQE score (``pypiqe``; 0 best, 100 worst) of a grey ``(H, W)`` image."""
    from pypiqe import piqe

    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"PIQE expects a grey (H, W) image, found shape {img.shape}")
    if not img.any():
        return float("nan")  # pypiqe divides by the maximum
    return float(piqe(img.astype(np.float64))[0])


def _summary(values: list[float]) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None,
            "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size), "n_failed": int(len(values) - v.size)}


def image_quality(
    real: Mapping[str, Sequence[Case]],
    synthetic: Mapping[str, Sequence[Case]],
    *,
    sequences: Sequence[str] = SEQUENCES,
    n_real: int | None = 300,
    n_synthetic: int | None = 300,
    seed: int = 0,
    preprocess: PreprocessConfig | None = None,
) -> dict:
    """BRISQUE and PIQE of the mid-tumour axial slice per sequence, real vs synthetic, per site.

    Args:
        real, synthetic: site name -> cases (sites may differ between the two).
        sequences: sequences to score.
        n_real, n_synthetic: cases drawn per site (paper: 300; None = all).
        seed: seeds the draws.
        preprocess: see :func:`prepare_case`.

    Returns:
        A JSON-ready dict::

            {"slice": "mid-tumour axial", "sequences": [...],
             "brisque": {site: {seq: {"real": {"mean", "sd", "n", "n_failed"}, "synthetic": {...}}}},
             "piqe": {...same...}}

        ``real``/``synthetic`` entries are absent for a site that has only one of the two.
    """
    seqs = check_sequences(sequences)
    if not real and not synthetic:
        raise ValueError("image_quality needs real and/or synthetic cases")
    model = BrisqueModel()
    out: dict = {"slice": "mid-tumour axial", "sequences": seqs, "brisque": {}, "piqe": {}}
    for kind, sites, n in (("real", real, n_real), ("synthetic", synthetic, n_synthetic)):
        for site, cases in sites.items():
            idx = sample_cases(cases, n, numpy_generator(seed, "image_quality", kind, site))
            scores = {m: {s: [] for s in seqs} for m in ("brisque", "piqe")}
            for i in idx:
                arrays = prepare_case(cases[i], preprocess)
                z = mid_tumour_slice(arrays.seg, arrays.images)
                for s in seqs:
                    img = to_uint8(arrays.images[SEQUENCES.index(s)][:, :, z])
                    for metric, fn in (("brisque", model.score), ("piqe", piqe_score)):
                        try:
                            value = fn(img)
                        except Exception as exc:  # an ill-posed fit on a flat slice: counted, not fatal
                            log.warning("%s failed on %s %s %s: %s", metric, kind, case_id_of(cases[i], i), s, exc)
                            value = float("nan")
                        scores[metric][s].append(value)
            for metric in ("brisque", "piqe"):
                site_entry = out[metric].setdefault(site, {s: {} for s in seqs})
                for s in seqs:
                    site_entry[s][kind] = _summary(scores[metric][s])
    return out

