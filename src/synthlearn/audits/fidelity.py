"""Fidelity of synthetic cases: Frechet distances per sequence, same site and across sites (image quality:
:mod:`synthlearn.audits.quality`).

Paper 000 (CATphishing), Tables 2 and 3: an FID per MRI sequence between 300 synthetic and 300 real
cases of each site, the cross-site matrix (synthetic site A vs real site B), and BRISQUE and PIQE of real
vs synthetic images. Both sets are preprocessed alike first ("zeroing the background and applying z-score
normalization to the brain area").

Frechet distance (Heusel et al. 2017, eq. 6): for feature sets with means ``mu1, mu2`` and covariances
``S1, S2``, ``FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The matrix square root is
``scipy.linalg.sqrtm`` with the usual ``eps * I`` offset on both covariances when the product is singular
(as in pytorch-fid); should the result still be unusable (non-finite, or a large imaginary part, which
happens when there are fewer cases than features), the trace is taken from the eigenvalues of the
symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` instead, which has the same trace of the square root.

Feature extractors (pluggable, :func:`make_extractor`): nothing here downloads weights.

* ``radiomics`` (default, :class:`RadiomicsFeatures`): a Frechet *Radiomics* Distance: pyradiomics
  first-order + GLCM features of each sequence over the whole brain (or the whole tumour), standardised
  with the mean and SD of all real cases in the comparison so every cell of the matrix uses one scale.
* ``torch`` (:class:`TorchFeatures`): any network the user supplies by file path, a TorchScript file, a
  ``torch.export`` archive or a state dict with the module it belongs to (e.g. MedicalNet / RadImageNet weights); a missing file is a
  clear ``FileNotFoundError``. Features are the network's output, globally average-pooled when spatial.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg

from synthlearn.data.contract import SEQUENCES, CaseRecord
from synthlearn.data.io import CaseArrays
from synthlearn.data.preprocess import PreprocessConfig, zscore_nonzero
from synthlearn.evaluate.radiomics import (
    RadiomicsExtractor,
    RadiomicsSettings,
    case_id_of,
    read_case_arrays,
    region_mask,
    voxel_spacing,
)
from synthlearn.training.seeding import numpy_generator

log = logging.getLogger(__name__)

Case = CaseRecord | CaseArrays

# --------------------------------------------------------------------------------------------------------
# Frechet distance


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                eps: float = 1e-6) -> float:
    """Frechet distance between two Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
        mu1, mu2: ``(F,)`` means.
        sigma1, sigma2: ``(F, F)`` covariances.
        eps: offset added to both diagonals when ``sigma1 @ sigma2`` is singular.

    Returns:
        The distance; rounding below zero (identical sets with singular covariances, ~1e-6) is returned as 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"expected means (F,) and covariances (F, F) of one F; found {mu1.shape}, {mu2.shape}, "
                         f"{sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr((sigma1 @ sigma2)^(1/2))``: scipy sqrtm (+ eps offset), eigenvalue route as the fallback."""
    with np.errstate(all="ignore"):
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    usable = np.isfinite(covmean).all()
    if usable and np.iscomplexobj(covmean):
        usable = np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    if usable:
        return float(np.trace(covmean))
    # same trace: sqrt(S1) S2 sqrt(S1) is symmetric PSD, its eigenvalues are those of S1 S2
    log.debug("sqrtm unusable (singular covariances); using the symmetric eigenvalue route")
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    inner = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between two feature sets (rows = cases), from their means and covariances.

    Args:
        features_a: ``(N, F)``.
        features_b: ``(M, F)``; N, M >= 2.
        eps: see :func:`frechet_distance_from_stats`.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, F) and (M, F) feature sets, found {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"each set needs at least 2 cases for a covariance, found {a.shape[0]} and {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN/inf; drop those rows first")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps)


# --------------------------------------------------------------------------------------------------------
# feature extractors


class SequenceFeatureExtractor(Protocol):
    """What :func:`fidelity` needs from a feature extractor."""

    name: str
    standardize: bool  # z-score features with the real cases' statistics before the distance

    def features(self, case: CaseArrays, sequences: Sequence[str],
                 channels: Sequence[str] = SEQUENCES) -> dict[str, np.ndarray]:
        """``sequence -> (F,)`` features of one (preprocessed) case; NaN when not computable. ``channels`` names
        the case's image channels in order (``sequences`` is a subset of them)."""
        ...

    def describe(self) -> dict:
        """JSON-ready description for results.json."""
        ...


class RadiomicsFeatures:
    """Per-sequence radiomics features of a region (Frechet Radiomics Distance); needs no weights.

    Args:
        region: ``"brain"`` (default: the whole image, as an FID looks at) or ``"tumour"``.
        settings: radiomics settings; default first-order + GLCM (shape does not depend on the sequence).
    """

    name = "radiomics"
    standardize = True

    def __init__(self, region: str = "brain", settings: RadiomicsSettings | None = None) -> None:
        if region not in ("brain", "tumour"):
            raise ValueError(f"region must be 'brain' or 'tumour', found {region!r}")
        self.region = region
        self.settings = settings or RadiomicsSettings(feature_classes=("firstorder", "glcm"))
        self._extractor = RadiomicsExtractor(self.settings)

    def features(self, case: CaseArrays, sequences: Sequence[str],
                 channels: Sequence[str] = SEQUENCES) -> dict[str, np.ndarray]:
        mask = region_mask(case.images, case.seg, self.region)
        spacing = voxel_spacing(case.affine)
        shape = self._extractor.shape_features(mask, spacing) if self.settings.with_shape else np.zeros(0)
        out = {}
        for seq in sequences:
            vec = self._extractor.intensity_features(case.images[list(channels).index(seq)], mask, spacing,
                                                     what=seq)
            out[seq] = np.concatenate([shape, vec])
        return out

    def describe(self) -> dict:
        return {"name": self.name, "region": self.region, "feature_classes": list(self.settings.feature_classes),
                "bin_count": self.settings.bin_count,
                "n_features": len(self._extractor.shape_feature_names())
                + len(self._extractor.intensity_feature_names())}


class TorchFeatures:
    """Features from a user-supplied network loaded by file path (nothing is downloaded).

    Args:
        weights_path: a TorchScript file (``torch.jit.save``), a ``torch.export`` archive (``.pt2``) or a
            state dict (``torch.save(model.state_dict())``, optionally under a ``state_dict`` key, ``module.``
            prefixes stripped; loaded with ``weights_only=True``).
        model: the network a state dict belongs to (e.g. ``monai.networks.nets.resnet10(spatial_dims=3,
            n_input_channels=1, feed_forward=False)`` for MedicalNet weights); not needed for TorchScript.
        input_size: resize each sequence volume to ``(X, Y, Z)`` (trilinear) before the network; None keeps it.
        device: torch device.
        strict: passed to ``load_state_dict``.

    The network gets one sequence at a time as ``(1, 1, X, Y, Z)`` float32; an output with spatial axes
    is averaged over them, so features are ``(F,)``.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ValueError: a state dict without ``model``, or one that does not fit it.
    """

    name = "torch"
    standardize = False

    def __init__(self, weights_path: str | Path, model=None, *, input_size: Sequence[int] | None = None,
                 device: str = "cpu", strict: bool = True) -> None:
        import torch

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: feature-network weights not found. synthlearn never downloads weights (offline): give "
                f"the path of a TorchScript file or of a state dict (with model=...), e.g. MedicalNet or "
                f"RadImageNet weights you obtained yourself, or use extractor='radiomics', which needs none")
        self.weights_path = path
        self.device = torch.device(device)
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        if self.input_size is not None and len(self.input_size) != 3:
            raise ValueError(f"input_size must be (X, Y, Z), found {input_size}")
        net = None
        if path.suffix == ".pt2":  # torch.export archive
            try:
                net = torch.export.load(str(path)).module().to(self.device)
            except Exception as exc:
                raise ValueError(f"{path}: not a loadable torch.export archive ({type(exc).__name__}: {exc})") from exc
            self.kind = "torch.export"
        else:
            try:
                with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; files saved with it still load
                    warnings.simplefilter("ignore", DeprecationWarning)
                    net = torch.jit.load(str(path), map_location=self.device)
                self.kind = "torchscript"
            except (RuntimeError, ValueError):
                net = None
        if net is None:
            try:
                state = torch.load(str(path), map_location=self.device, weights_only=True)
            except Exception as exc:
                raise ValueError(f"{path}: neither a TorchScript file nor a state dict loadable with "
                                 f"weights_only=True ({type(exc).__name__}: {exc})") from exc
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
            if model is None:
                raise ValueError(f"{path} is a state dict: pass model= (the torch.nn.Module it belongs to), "
                                 f"or save the network as TorchScript")
            state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
            try:
                model.load_state_dict(state, strict=strict)
            except RuntimeError as exc:
                raise ValueError(f"{path}: the state dict does not fit {type(model).__name__}: {exc}") from exc
            net = model.to(self.device)
            self.kind = "state_dict"
        if self.kind != "torch.export":  # an exported program is frozen in the mode it was exported in
            net = net.eval()
        self.net = net

    def features(self, case: CaseArrays, sequences: Sequence[str],
                 channels: Sequence[str] = SEQUENCES) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        out = {}
        with torch.no_grad():
            for seq in sequences:
                x = torch.from_numpy(np.ascontiguousarray(case.images[list(channels).index(seq)], dtype=np.float32))
                x = x[None, None].to(self.device)
                if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
                    x = F.interpolate(x, size=self.input_size, mode="trilinear", align_corners=False)
                y = self.net(x)
                if isinstance(y, (tuple, list)):
                    y = y[0]
                if y.ndim > 2:
                    y = y.flatten(2).mean(-1)
                out[seq] = y.reshape(-1).double().cpu().numpy()
        return out

    def describe(self) -> dict:
        return {"name": self.name, "weights_path": str(self.weights_path), "kind": self.kind,
                "input_size": list(self.input_size) if self.input_size else None}


def make_extractor(name: str = "radiomics", **kwargs) -> SequenceFeatureExtractor:
    """A feature extractor by name: ``radiomics`` (:class:`RadiomicsFeatures`) or ``torch``
    (:class:`TorchFeatures`, needs ``weights_path=``)."""
    if name == "radiomics":
        return RadiomicsFeatures(**kwargs)
    elif name == "torch":
        if "weights_path" not in kwargs:
            raise ValueError("extractor 'torch' needs weights_path= (a TorchScript file or a state dict)")
        return TorchFeatures(**kwargs)
    else:
        raise ValueError(f"unknown feature extractor {name!r}; expected 'radiomics' or 'torch'")


# --------------------------------------------------------------------------------------------------------
# loading and sampling cases


def check_sequences(sequences: Sequence[str], channels: Sequence[str] = SEQUENCES) -> list[str]:
    """``sequences`` as a list, checked to be a non-empty subset of ``channels`` (the cases' image channels)."""
    seqs = list(sequences)
    if not seqs or any(s not in channels for s in seqs):
        raise ValueError(f"sequences must be a non-empty subset of the cases' channels {tuple(channels)}, found "
                         f"{seqs}")
    return seqs


def sample_cases(cases: Sequence[Case], n: int | None, rng: np.random.Generator) -> list[int]:
    """Indices of up to ``n`` cases drawn without replacement (all when ``n`` is None or >= len), sorted."""
    if n is not None and int(n) < 1:
        raise ValueError(f"number of cases must be >= 1 or None, found {n}")
    if n is None or n >= len(cases):
        return list(range(len(cases)))
    return sorted(rng.choice(len(cases), size=int(n), replace=False).tolist())


def prepare_case(case: Case, preprocess: PreprocessConfig | None) -> CaseArrays:
    """Read a case and preprocess it the way the paper does before FID/IQA: ``preprocess`` when given,
    else background kept at zero and each sequence z-scored over the brain."""
    arrays = read_case_arrays(case, preprocess)
    if preprocess is None:
        arrays = CaseArrays(images=zscore_nonzero(arrays.images), seg=arrays.seg, affine=arrays.affine)
    return arrays


def check_sites(name: str, sites: Mapping[str, Sequence[Case]]) -> None:
    if not isinstance(sites, Mapping) or not sites:
        raise ValueError(f"{name} must be a non-empty mapping site -> cases, found {type(sites).__name__}")
    for site, cases in sites.items():
        if len(cases) < 2:
            raise ValueError(f"{name}[{site!r}] needs at least 2 cases, found {len(cases)}")


# --------------------------------------------------------------------------------------------------------
# Frechet distances per sequence, per site and across sites


def fidelity(
    real: Mapping[str, Sequence[Case]],
    synthetic: Mapping[str, Sequence[Case]],
    *,
    extractor: str | SequenceFeatureExtractor = "radiomics",
    sequences: Sequence[str] | None = None,
    channels: Sequence[str] = SEQUENCES,
    n_real: int | None = 300,
    n_synthetic: int | None = 300,
    seed: int = 0,
    preprocess: PreprocessConfig | None = None,
    progress: bool = False,
) -> dict:
    """Per-sequence Frechet distances between synthetic and real cases, per site and across sites.

    Args:
        real: real site name -> its cases.
        synthetic: synthetic site name (the site whose generator made them) -> its cases.
        extractor: ``"radiomics"`` or any :class:`SequenceFeatureExtractor` instance, e.g.
            ``TorchFeatures(weights_path=...)`` (``"torch"`` by name is refused: it needs a weights path).
        sequences: sequences to compare (None: every channel).
        channels: names of the cases' image channels, in order (default the four glioma sequences; a study of
            other sequences, e.g. one T2 slice or RGB tiles, names its own). 2D images go in as ``(C, X, Y, 1)``.
        n_real, n_synthetic: cases drawn per site without replacement (paper: 300 and 300; None = all).
        seed: seeds the draws (``derive_seed(seed, "fidelity", kind, site)``).
        preprocess: see :func:`prepare_case`.
        progress: show a progress bar.

    Returns:
        A JSON-ready dict::

            {"extractor": {...}, "sequences": [...], "real_sites": [...], "synthetic_sites": [...],
             "n_real": {site: n used}, "n_synthetic": {site: n used},
             "n_failed": {"real": {site: n}, "synthetic": {site: n}},   # cases without features
             "matrix": {seq: [[FD(synthetic A, real B) for B in real_sites] for A in synthetic_sites]},
             "same_site": {site: {seq: FD}}}   # synthetic vs real of the same site (the matrix diagonal)
    """
    channels = tuple(channels)
    seqs = check_sequences(channels if sequences is None else sequences, channels)
    check_sites("real", real)
    check_sites("synthetic", synthetic)
    if isinstance(extractor, str):
        if extractor == "torch":
            raise ValueError("extractor 'torch' needs weights: pass TorchFeatures(weights_path=..., model=...)")
        extractor = make_extractor(extractor)

    def extract(kind: str, sites: Mapping[str, Sequence[Case]], n: int | None):
        feats, failed, used = {}, {}, {}
        for site, cases in sites.items():
            idx = sample_cases(cases, n, numpy_generator(seed, "fidelity", kind, site))
            rows = {s: [] for s in seqs}
            bad = 0
            it = idx
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(idx, desc=f"features {kind} {site}", leave=False)
            for i in it:
                f = extractor.features(prepare_case(cases[i], preprocess), seqs, channels)
                if any(not np.isfinite(f[s]).all() for s in seqs):
                    bad += 1
                    log.warning("fidelity: %s case %s of %s has no usable features; left out",
                                kind, case_id_of(cases[i], i), site)
                    continue
                for s in seqs:
                    rows[s].append(f[s])
            if len(rows[seqs[0]]) < 2:
                raise ValueError(f"fidelity: {kind} site {site!r} has {len(rows[seqs[0]])} cases with usable "
                                 f"features; need at least 2")
            feats[site] = {s: np.stack(rows[s]) for s in seqs}
            failed[site] = bad
            used[site] = len(rows[seqs[0]])
        return feats, failed, used

    real_f, real_failed, real_n = extract("real", real, n_real)
    syn_f, syn_failed, syn_n = extract("synthetic", synthetic, n_synthetic)
    matrix: dict[str, list[list[float]]] = {}
    for s in seqs:
        if extractor.standardize:  # one scale for the whole matrix: statistics of every real case
            pooled = np.concatenate([real_f[site][s] for site in real])
            mean, sd = pooled.mean(0), pooled.std(0)
            sd = np.where(sd > 1e-12, sd, 1.0)
        else:
            mean, sd = 0.0, 1.0
        matrix[s] = [[frechet_distance((syn_f[a][s] - mean) / sd, (real_f[b][s] - mean) / sd) for b in real]
                     for a in synthetic]
    real_sites, syn_sites = list(real), list(synthetic)
    same_site = {site: {s: matrix[s][syn_sites.index(site)][real_sites.index(site)] for s in seqs}
                 for site in syn_sites if site in real_sites}
    return {
        "extractor": extractor.describe(),
        "sequences": seqs,
        "real_sites": real_sites,
        "synthetic_sites": syn_sites,
        "n_real": real_n,
        "n_synthetic": syn_n,
        "n_failed": {"real": real_failed, "synthetic": syn_failed},
        "matrix": matrix,
        "same_site": same_site,
    }


# --------------------------------------------------------------------------------------------------------
# no-reference image quality (BRISQUE, PIQE) on the mid-tumour axial slice
