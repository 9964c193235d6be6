"""Privacy audit of a site's synthetic cases: the paper's SSIM membership inference with its controls,
and a nearest-neighbour copy rate with a montage of the closest pairs.

Paper 000, "Discussion" and Supplementary Note 4: a distance-based membership inference attack (MIA)
on the synthetic data. Members are a site's training cases, non-members held-out cases of the same
distribution; a case's score is its best SSIM to any synthetic case; the paper reports AUC 0.493.
``../shared/design/PRIVACY.md`` (battery items P2 and P3): such an attack only counts with

* a **negative control**: the site's members split in two random halves and attacked "half A vs half B"
  (both are members, so the AUC must sit at chance: its 95 % CI covers 0.5; on a handful of cases, where
  the bootstrap CI collapses, a two-sided exact Mann-Whitney p >= 0.05 also counts as chance), and
* a **positive control**: a "generator" deliberately over-fitted to a few training cases
  (:func:`make_memorising_set`: noisy, intensity-jittered copies of them; a *control*, not a model)
  must be caught: its AUC (memorised cases vs held-out cases) is high (>= ``caught_auc``, CI above 0.5). On the
  default phantom these copies were caught at every noise level tried, up to 10x the brain's SD: this control
  checks that the pipeline scores a near-copy as closer than a non-member (cases paired, scaled and windowed
  alike), not how weak a leak the attack can find; the next control does that, and
* where the caller gives one (``control_synthetic``), a **generator positive control**: the samples of a real
  generator deliberately over-fitted to a few training cases
  (:func:`synthlearn.generators.ldm.memorising.train_memorising_generator`) attacked the same way, its memorised
  cases vs the held-out ones; it must be caught by the same rule. This is the control issue 5 asks for: it
  tests the attack against what an actual leaking generator emits (decoded, blurred by the autoencoder),
  where the copies above test it against near-exact copies, and
* where the caller gives them (``reference_synthetic``), a **reference control**: the same members and
  non-members attacked with the synthetic cases of generators that never saw them (in a study: the other
  sites'). Whatever AUC these reach comes from the split itself (with a dozen non-members, members can
  happen to be more typical brains, closer to *any* synthetic case), so a membership AUC above chance is
  evidence against the site's generator only as far as it exceeds the reference (``excess_auc``).

SSIM, exactly: the 3D SSIM of Wang et al. (2004) with an isotropic Gaussian window (sigma 1.5 voxels,
truncated at 3.5 sigma, i.e. 11^3), K1 = 0.01, K2 = 0.03, on volumes scaled to [0, 1] (each sequence
windowed to its brain's 0.5-99.5th percentiles, background 0; for synthetic images without a zero
background, ``ssim_region = "grid"``: the whole grid's), averaged over the four sequences and the
voxels at least 5 voxels from the border. This equals ``skimage.metrics.structural_similarity(x, y,
channel_axis=0, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (checked
in the tests). 2D images go in as ``(C, X, Y, 1)``: an axis of length 1 is not filtered, so they get the
2D SSIM of the same window (11^2; skimage's 2D result, also checked); it is computed here in torch with the per-case statistics cached, so a case against many
synthetic cases costs one filtered product per pair (MONAI's ``SSIMMetric`` recomputes everything per
pair with a full 11^3 convolution: 0.1 s per pair at 32^3 on the project's CPU, against ~0.7 ms here).

Copy rate (P3): distance = 1 - SSIM. For each held-out case, its distance to the nearest training case;
the threshold is the ``copy_percentile``-th percentile (default 5) of those. The copy rate is the share
of synthetic cases whose nearest training case is closer than that threshold (a real held-out case is
that close to the training set only 5 % of the time).

Everything is held in memory as float32: about ``4 * 4 * X*Y*Z`` bytes per case and 3x that for the
SSIM statistics (32^3: 0.5 MB + 1.2 MB per case).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.stats import mannwhitneyu, rankdata

from synthlearn.data.contract import SEQUENCES, CaseRecord, SiteRecord
from synthlearn.data.io import CaseArrays
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.audits.quality import mid_tumour_slice
from synthlearn.evaluate.radiomics import case_id_of, read_case_arrays
from synthlearn.training.seeding import numpy_generator

log = logging.getLogger(__name__)

Case = CaseRecord | CaseArrays

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
#: PRIVACY.md P1: members and non-members needed to certify an AUC upper bound of 0.55.
CERTIFY_N = 250

SSIM_METHOD = ("3D SSIM (Wang et al. 2004), Gaussian window sigma 1.5 (11^3), K1 0.01, K2 0.03, volumes "
               "windowed to [0, 1] per sequence, mean over sequences; equals skimage structural_similarity("
               "gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)")
#: the same for 2D images (given as ``(C, X, Y, 1)``: the singleton axis is not filtered)
SSIM_METHOD_2D = SSIM_METHOD.replace("3D SSIM", "2D SSIM").replace("(11^3)", "(11^2)").replace("volumes", "images")

# --------------------------------------------------------------------------------------------------------
# SSIM


def normalize_for_ssim(images: np.ndarray, region: Literal["brain", "grid"] = "brain") -> np.ndarray:
    """Window each sequence of ``(C, X, Y, Z)`` images to [0, 1] by its 0.5-99.5th percentiles.

    ``region = "brain"``: the percentiles of the brain, where any sequence is non-zero; outside it stays 0.
    Makes raw, z-scored and synthetic intensities comparable with one ``data_range = 1``. ``"grid"``: the
    percentiles of the whole grid, every voxel windowed (nothing is background): for images that have no
    zero background, such as FedKD's compressed samples, optimised from noise, whose every voxel the brain
    rule would count as brain (the windowing of a real case changed by 0.1 SD would then differ from its
    own, and its SSIM to it fall from 1 to ~0.5).

    Returns:
        ``(C, X, Y, Z)`` float32 in [0, 1].
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), found shape {images.shape}")
    if region == "brain":
        brain = np.any(images != 0, axis=0)
    elif region == "grid":
        brain = np.ones(images.shape[1:], dtype=bool)
    else:
        raise ValueError(f"region must be 'brain' or 'grid', found {region!r}")
    out = np.zeros_like(images)
    if not brain.any():
        return out
    for c in range(images.shape[0]):
        vals = images[c][brain]
        lo, hi = np.percentile(vals, [0.5, 99.5])
        scaled = np.clip((images[c] - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
        out[c] = np.where(brain, scaled, 0.0)
    return out


def _gaussian_matrix(n: int, sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """``(n - 2r, n)`` matrix of a 1D Gaussian filter with scipy's ``reflect`` boundary, rows cropped by
    the radius ``r`` (SSIM averages only where the window fits). An axis of length 1 is not filtered (``[[1]]``):
    a 2D image given as ``(C, X, Y, 1)`` gets the 2D SSIM of its slice."""
    r = int(truncate * sigma + 0.5)
    if n == 1:
        return np.ones((1, 1))
    if n < 2 * r + 1:
        raise ValueError(f"SSIM needs at least {2 * r + 1} voxels along every axis, found {n}")
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for o in range(-r, r + 1):
            j = i + o
            while j < 0 or j >= n:  # scipy 'reflect': (d c b a | a b c d | d c b a)
                j = -j - 1 if j < 0 else 2 * n - j - 1
            m[i, j] += k[o + r]
    return m[r:n - r]


class SSIMVolumes:
    """A stack of volumes with the Gaussian-filtered statistics SSIM needs, computed once.

    Args:
        volumes: ``(N, C, X, Y, Z)`` in [0, ``data_range``] (see :func:`normalize_for_ssim`).
        data_range: the intensity range.
    """

    def __init__(self, volumes: np.ndarray, data_range: float = 1.0) -> None:
        v = np.asarray(volumes, dtype=np.float32)
        if v.ndim != 5:
            raise ValueError(f"volumes must be (N, C, X, Y, Z), found shape {v.shape}")
        self.shape = tuple(v.shape[1:])
        self.data_range = float(data_range)
        self.mats = [torch.from_numpy(_gaussian_matrix(n).astype(np.float32)) for n in self.shape[1:]]
        self.x = torch.from_numpy(np.ascontiguousarray(v))
        self.mu = torch.cat([self._filter(self.x[i:i + 8]) for i in range(0, len(v), 8)]) if len(v) else None
        self.var = (torch.cat([self._filter(self.x[i:i + 8] ** 2) for i in range(0, len(v), 8)]) - self.mu ** 2
                    if len(v) else None)

    def __len__(self) -> int:
        return self.x.shape[0]

    def _filter(self, a: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian filter of ``(B, C, X, Y, Z)`` as three matrix products (no transposed copies)."""
        mx, my, mz = self.mats
        b, c, x, y, z = a.shape
        a = a.reshape(-1, z) @ mz.T                              # (B*C*X*Y, Z')
        zp = a.shape[-1]
        a = torch.matmul(my, a.reshape(b * c * x, y, zp))          # (B*C*X, Y', Z')
        yp = a.shape[1]
        a = torch.matmul(mx, a.reshape(b * c, x, yp * zp))         # (B*C, X', Y'*Z')
        return a.reshape(b, c, -1, yp, zp)

    def ssim_to(self, other: SSIMVolumes, i: int, chunk: int | None = None) -> torch.Tensor:
        """SSIM of volume ``i`` of this stack to every volume of ``other``: ``(len(other),)``.

        ``chunk`` volumes of ``other`` are filtered at once (default: about 2^19 voxels per chunk, which
        kept the temporaries in cache: 4 at 32^3, 1 at 64^3 on the project's CPU)."""
        if chunk is None:
            chunk = max(1, 2 ** 19 // int(np.prod(self.shape)))
        c1 = (SSIM_K1 * self.data_range) ** 2
        c2 = (SSIM_K2 * self.data_range) ** 2
        xi, mu_i, var_i = self.x[i:i + 1], self.mu[i:i + 1], self.var[i:i + 1]
        out = []
        for s in range(0, len(other), chunk):
            mu_o, var_o = other.mu[s:s + chunk], other.var[s:s + chunk]
            cov = self._filter(xi * other.x[s:s + chunk]) - mu_i * mu_o
            num = (2 * mu_i * mu_o + c1) * (2 * cov + c2)
            den = (mu_i ** 2 + mu_o ** 2 + c1) * (var_i + var_o + c2)
            out.append((num / den).flatten(1).double().mean(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def ssim_matrix(a: SSIMVolumes | np.ndarray, b: SSIMVolumes | np.ndarray, *, data_range: float = 1.0,
                progress: bool = False, desc: str = "SSIM") -> np.ndarray:
    """SSIM between every volume of ``a`` and every volume of ``b``.

    Args:
        a: ``(Na, C, X, Y, Z)`` volumes or their :class:`SSIMVolumes`.
        b: ``(Nb, C, X, Y, Z)`` likewise (same C, X, Y, Z).
        data_range: intensity range for arrays.
        progress: show a progress bar over rows.

    Returns:
        ``(Na, Nb)`` float64.
    """
    a = a if isinstance(a, SSIMVolumes) else SSIMVolumes(a, data_range)
    b = b if isinstance(b, SSIMVolumes) else SSIMVolumes(b, data_range)
    if a.shape != b.shape:
        raise ValueError(f"volumes differ in shape: {a.shape} vs {b.shape}")
    if a.data_range != b.data_range:
        raise ValueError(f"data_range differs: {a.data_range} vs {b.data_range}")
    out = np.zeros((len(a), len(b)))
    rows = range(len(a))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=desc, leave=False)
    with torch.no_grad():
        for i in rows:
            out[i] = a.ssim_to(b, i).numpy()
    return out


def ssim_3d(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of two ``(C, X, Y, Z)`` volumes (mean over channels), see the module docstring."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (C, X, Y, Z) volumes of one shape, found {x.shape} and {y.shape}")
    return float(ssim_matrix(x[None], y[None], data_range=data_range)[0, 0])


# --------------------------------------------------------------------------------------------------------
# attack metrics


def auc_score(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of scores where ``positive`` should be higher (Mann-Whitney U with mid-ranks for ties)."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs positive and negative scores, found {pos.size} and {neg.size}")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """Largest true-positive rate at a threshold whose false-positive rate is <= ``fpr`` (a case is called
    positive when its score >= the threshold). With fewer than ``1 / fpr`` negatives this is the share of
    positives above every negative."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.sort(np.asarray(negative, np.float64).ravel())
    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))
    fprs = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    tprs = (pos[None, :] >= thresholds[:, None]).mean(1)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max())


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, n_bootstrap: int = 1000,
                   rng: np.random.Generator | None = None) -> dict:
    """AUC (members positive) with a stratified bootstrap 95 % CI, and TPR at 1 % FPR.

    Args:
        member_scores: ``(Nm,)`` attack scores of members (higher = "more likely a member").
        nonmember_scores: ``(Nn,)`` scores of non-members.
        n_bootstrap: bootstrap resamples (members and non-members resampled separately).
        rng: randomness for the bootstrap (default seeded with 0).

    Returns:
        ``{"auc", "ci_low", "ci_high", "p_value", "tpr_at_1pct_fpr", "n_members", "n_nonmembers",
        "member_score_mean", "nonmember_score_mean", "min_resolvable_fpr"}``; ``p_value`` is the two-sided
        Mann-Whitney U test of AUC = 0.5 (scipy; exact for small samples without ties).
    """
    m, n = np.asarray(member_scores, np.float64).ravel(), np.asarray(nonmember_scores, np.float64).ravel()
    if m.size < 1 or n.size < 1:
        raise ValueError(f"need members and non-members, found {m.size} and {n.size}")
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap must be >= 1, found {n_bootstrap}")
    rng = rng if rng is not None else np.random.default_rng(0)
    boots = np.array([auc_score(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
                      for _ in range(int(n_bootstrap))])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    p_value = float(mannwhitneyu(m, n, alternative="two-sided").pvalue) if m.size and n.size else 1.0
    return {
        "auc": auc_score(m, n),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": p_value if np.isfinite(p_value) else 1.0,
        "tpr_at_1pct_fpr": tpr_at_fpr(m, n, 0.01),
        "n_members": int(m.size),
        "n_nonmembers": int(n.size),
        "member_score_mean": float(m.mean()),
        "nonmember_score_mean": float(n.mean()),
        "min_resolvable_fpr": float(1.0 / n.size),
    }


# --------------------------------------------------------------------------------------------------------
# members and non-members


def stratified_holdout(site: SiteRecord, fraction: float, stratum: Callable[[CaseRecord], str | None],
                       seed: int) -> tuple[list[str], list[str]]:
    """Split a site's cases into members (what the site's generator or compression uses) and held-out
    non-members (what it never sees: the membership audit's non-members and the copy rate's reference).

    Within each stratum (``stratum(case)``, e.g. the case's IDH class; None or "" form an ``unknown``
    stratum), cases sorted by id are shuffled with ``numpy_generator(seed, "privacy-holdout", site,
    stratum)`` and the first ``floor(fraction * n)`` held out, so the split is stratified and reproducible
    (a stratum of fewer than ``1 / fraction`` cases keeps all of them).

    Args:
        site: the site.
        fraction: share held out, in [0, 1).
        stratum: ``CaseRecord -> str | None``.
        seed: the split's seed.

    Returns:
        ``(member_ids, holdout_ids)``, both sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), found {fraction}")
    groups: dict[str, list[str]] = {}
    for case in site.cases:
        groups.setdefault(stratum(case) or "unknown", []).append(case.case_id)
    members, holdout = [], []
    for cls, ids in sorted(groups.items()):
        ids = sorted(ids)
        order = numpy_generator(seed, "privacy-holdout", site.name, cls).permutation(len(ids))
        k = int(np.floor(fraction * len(ids)))
        holdout += [ids[i] for i in order[:k]]
        members += [ids[i] for i in order[k:]]
    return sorted(members), sorted(holdout)


# --------------------------------------------------------------------------------------------------------
# the positive control and the copy rate


def make_memorising_set(
    cases: Sequence[CaseArrays],
    *,
    copies_per_case: int = 2,
    noise_std: float = 0.05,
    intensity_jitter: float = 0.05,
    rng: np.random.Generator,
) -> list[CaseArrays]:
    """THE POSITIVE CONTROL, not a generator: what a generator that memorised ``cases`` would emit.

    Each case is copied ``copies_per_case`` times; every copy gets, per sequence, a multiplicative
    intensity jitter ``1 + U(-intensity_jitter, intensity_jitter)`` and Gaussian noise of
    ``noise_std`` x that sequence's SD inside the brain (background stays 0; the segmentation is copied).
    An audit that cannot tell these copies' sources from held-out cases cannot certify anything.

    Args:
        cases: the few training cases the control "over-fits" to, ``images (4, X, Y, Z)``.
        copies_per_case: copies of each case (>= 1).
        noise_std: noise SD relative to each sequence's brain SD (>= 0).
        intensity_jitter: half-width of the multiplicative jitter (in [0, 1)).
        rng: randomness (same seed, same copies).

    Returns:
        ``len(cases) * copies_per_case`` cases, copies of case 0 first.
    """
    if int(copies_per_case) < 1:
        raise ValueError(f"copies_per_case must be >= 1, found {copies_per_case}")
    if noise_std < 0 or not 0 <= intensity_jitter < 1:
        raise ValueError(f"noise_std must be >= 0 and intensity_jitter in [0, 1), found {noise_std}, "
                         f"{intensity_jitter}")
    out = []
    for case in cases:
        images = np.asarray(case.images, dtype=np.float32)
        brain = np.any(images != 0, axis=0)
        sds = [float(images[c][brain].std()) if brain.any() else 0.0 for c in range(images.shape[0])]
        for _ in range(int(copies_per_case)):
            copy = np.empty_like(images)
            for c in range(images.shape[0]):
                scale = 1.0 + rng.uniform(-intensity_jitter, intensity_jitter)
                noise = rng.normal(0.0, noise_std * sds[c], size=images.shape[1:]).astype(np.float32)
                copy[c] = np.where(brain, images[c] * scale + noise, 0.0)
            out.append(CaseArrays(images=copy, seg=None if case.seg is None else case.seg.copy(),
                                  affine=case.affine))
    return out


def copy_rate(synthetic_to_train: np.ndarray, holdout_to_train: np.ndarray, percentile: float = 5.0) -> dict:
    """Share of synthetic cases closer to their nearest training case than real held-out cases usually are.

    Args:
        synthetic_to_train: ``(Ns, Nt)`` distances (1 - SSIM) from synthetic to training cases.
        holdout_to_train: ``(Nh, Nt)`` distances from held-out to training cases.
        percentile: the threshold is this percentile of the held-out cases' nearest-training distances.

    Returns:
        ``{"rate", "threshold", "percentile", "n_copies", "n_synthetic", "nearest_distance" (Ns list),
        "nearest_train" (Ns list of training indices)}``.
    """
    s, h = np.asarray(synthetic_to_train, np.float64), np.asarray(holdout_to_train, np.float64)
    if s.ndim != 2 or h.ndim != 2 or s.shape[1] != h.shape[1] or s.shape[1] == 0 or h.shape[0] == 0:
        raise ValueError(f"expected (Ns, Nt) and (Nh, Nt) distances with Nt, Nh >= 1, found {s.shape}, {h.shape}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], found {percentile}")
    threshold = float(np.percentile(h.min(axis=1), percentile))
    nearest = s.min(axis=1) if s.shape[0] else np.zeros(0)
    copies = nearest < threshold
    return {
        "rate": float(copies.mean()) if s.shape[0] else 0.0,
        "threshold": threshold,
        "percentile": float(percentile),
        "n_copies": int(copies.sum()),
        "n_synthetic": int(s.shape[0]),
        "nearest_distance": nearest.tolist(),
        "nearest_train": (s.argmin(axis=1).tolist() if s.shape[0] else []),
    }


# --------------------------------------------------------------------------------------------------------
# montage


def draw_closest_pairs(
    pairs: Sequence[tuple[CaseArrays, str, CaseArrays, str, float]],
    out: str | Path,
    *,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """A PNG of synthetic/real pairs: per row, the synthetic case's four sequences then the real case's,
    at the synthetic case's mid-tumour axial slice, tumour outlined, with the pair's distance.

    Args:
        pairs: ``(synthetic, synthetic_id, real, real_id, distance)``, closest first; images in [0, 1].
        out: PNG path.
        threshold: the copy threshold, marked in each row's title when the pair is below it.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthlearn.report.grid import SEQUENCE_TITLES

    if not pairs:
        raise ValueError("no pairs to draw")
    n, ncol = len(pairs), 2 * len(SEQUENCES)
    top = 0.6 if title else 0.2
    height = 1.75 * n + 0.3 * n + top
    fig, axes = plt.subplots(n, ncol, figsize=(1.6 * ncol + 0.2, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - top / height, wspace=0.03,
                        hspace=0.3 * n / (1.75 * n) + 0.02)
    for r, (syn, syn_id, real, real_id, dist) in enumerate(pairs):
        z = mid_tumour_slice(syn.seg, syn.images)
        for half, (case, who) in enumerate(((syn, "syn"), (real, "real"))):
            for c, seq in enumerate(SEQUENCES):
                ax = axes[r, half * len(SEQUENCES) + c]
                ax.imshow(np.rot90(case.images[c][:, :, z])[:, ::-1], cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                if case.seg is not None:
                    mask = case.seg[:, :, z] > 0
                    if mask.any() and not mask.all():
                        ax.contour(np.rot90(mask.astype(float))[:, ::-1], levels=[0.5], colors="yellow",
                                   linewidths=0.7)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.03, 0.97, f"{who} {SEQUENCE_TITLES.get(seq, seq)}", transform=ax.transAxes,
                        color="white", fontsize=7, ha="left", va="top")
        flag = "  BELOW COPY THRESHOLD" if threshold is not None and dist < threshold else ""
        axes[r, 0].text(0.0, 1.03, f"{syn_id}  vs nearest training case {real_id}:  1 - SSIM = {dist:.4f}{flag}",
                        transform=axes[r, 0].transAxes, fontsize=8, ha="left", va="bottom",
                        color="red" if flag else "black")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------------
# the audit of one site


def _load(cases: Sequence[Case], role: str, preprocess: PreprocessConfig | None) -> tuple[list[CaseArrays], list[str]]:
    arrays = [read_case_arrays(c, preprocess) for c in cases]
    ids = [case_id_of(c, i, prefix=role) for i, c in enumerate(cases)]
    return arrays, ids


def _normalised(arrays: Sequence[CaseArrays], region: Literal["brain", "grid"] = "brain") -> list[CaseArrays]:
    return [CaseArrays(images=normalize_for_ssim(a.images, region), seg=a.seg, affine=a.affine) for a in arrays]


def audit_site(
    train_cases: Sequence[Case],
    holdout_cases: Sequence[Case],
    synthetic_cases: Sequence[Case],
    *,
    preprocess: PreprocessConfig | None = None,
    copy_percentile: float = 5.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
    montage_path: str | Path | None = None,
    montage_k: int = 6,
    positive_n_cases: int | None = None,
    positive_copies_per_case: int = 2,
    positive_noise_std: float = 0.1,
    positive_intensity_jitter: float = 0.05,
    caught_auc: float = 0.9,
    control_synthetic: Sequence[Case] | None = None,
    control_case_ids: Sequence[str] | None = None,
    reference_synthetic: Mapping[str, Sequence[Case]] | None = None,
    ssim_region: Literal["brain", "grid"] = "brain",
    progress: bool = False,
) -> dict:
    """The privacy audit of one site's synthetic data (PRIVACY.md P2 + P3 with both controls).

    Args:
        train_cases: the site's training cases (members), >= 2.
        holdout_cases: held-out cases of the same distribution (non-members), >= 2.
        synthetic_cases: the synthetic cases of the site's generator, >= 1.
        preprocess: applied to every case first (use the study's preprocessing when real and synthetic
            shapes differ); without it, all cases must share one shape.
        copy_percentile: percentile of held-out-to-training nearest distances used as the copy threshold.
        n_bootstrap: bootstrap resamples for the AUC CIs.
        seed: seeds the half split, the control's choice of cases and noise, and the bootstraps.
        montage_path: where to write the PNG of the closest synthetic/real pairs (None: no picture).
        montage_k: number of pairs in the montage.
        positive_n_cases: training cases the positive control over-fits to (default ``min(5, n_train)``).
        positive_copies_per_case, positive_noise_std, positive_intensity_jitter: see :func:`make_memorising_set`.
        caught_auc: the positive control is caught when its AUC >= this and its CI lies above 0.5.
        control_synthetic: samples of a generator over-fitted to ``control_case_ids`` (the generator positive
            control; None: not run).
        control_case_ids: the training cases that generator memorised, by ``case_id`` or ``site/case_id``
            (required with ``control_synthetic``; every one must be among ``train_cases``).
        reference_synthetic: the reference control: synthetic cases of generators that never saw this site's
            cases (in a study, the other sites' generators), by name. The same members and non-members are
            scored against each set; an AUC away from 0.5 there comes from the split (members and non-members
            differ in how typical they are), not from this generator, and the membership AUC is read against it.
            None or empty: not run.
        ssim_region: the windowing of every case before SSIM (:func:`normalize_for_ssim`): ``brain`` (synthetic
            cases with a zero background, as a generator's) or ``grid`` (synthetic images without one, as FedKD's
            compressed samples).
        progress: show progress bars.

    Returns:
        A JSON-ready dict::

            {"method": str, "ssim_region": str, "n_train", "n_holdout", "n_synthetic", "shape": [C, X, Y, Z],
             "membership": attack_metrics(...) + {"above_chance": CI low > 0.5,
                 "underpowered": fewer than 250 members or non-members (PRIVACY.md P1),
                 "certifies_auc_below_0_55": not underpowered and CI high < 0.55},
             "negative_control": attack_metrics(half A vs half B) + {"ci_covers_chance", "ok": the CI covers
                 0.5, or, where a handful of cases makes the bootstrap CI collapse, p_value >= 0.05},
             "positive_control": attack_metrics(memorised cases vs held-out) + {"caught", "auc_all_members",
                 "memorised_case_ids", "copies_per_case", "noise_std", "intensity_jitter", "copy_rate"},
             "copy_rate": {"rate", "threshold", "percentile", "n_copies", "n_synthetic",
                 "closest": [{"synthetic", "train", "distance"} for the montage_k closest]},
             "montage": path or None,
             "negative_control_ok": bool, "positive_control_caught": bool}

        with ``reference_synthetic``, ``"reference_control"``: {"by_generator": {name: attack_metrics(members vs
        non-members, best SSIM to that generator's cases) + {"n_synthetic"}}, "auc_mean": their mean AUC,
        "excess_auc": membership AUC - auc_mean, "excess_ci_low", "excess_ci_high": its 95 % CI from a paired
        bootstrap (the same resampled cases for the attack and its references), "excess_above_zero": CI low > 0};
        and, with ``control_synthetic``, ``"positive_control_generator"``: attack_metrics(memorised cases vs
        held-out, best SSIM to the control generator's samples) + {"caught", "auc_all_members",
        "memorised_case_ids", "n_samples", "copy_rate"} and ``"positive_control_generator_caught"``.
    """
    if len(train_cases) < 2 or len(holdout_cases) < 2 or len(synthetic_cases) < 1:
        raise ValueError(f"audit_site needs >= 2 training, >= 2 held-out and >= 1 synthetic cases, found "
                         f"{len(train_cases)}, {len(holdout_cases)}, {len(synthetic_cases)}")
    if int(montage_k) < 1:
        raise ValueError(f"montage_k must be >= 1, found {montage_k}")
    if ssim_region not in ("brain", "grid"):
        raise ValueError(f"ssim_region must be 'brain' or 'grid', found {ssim_region!r}")
    normalised = lambda arrays: _normalised(arrays, ssim_region)
    if (control_synthetic is None) != (control_case_ids is None):
        raise ValueError("control_synthetic and control_case_ids go together: the generator positive control needs "
                         "its samples and the ids of the cases it memorised")
    if control_synthetic is not None and (len(control_synthetic) < 1 or not control_case_ids):
        raise ValueError(f"the generator positive control needs >= 1 sample and >= 1 memorised case id, found "
                         f"{len(control_synthetic)} and {len(control_case_ids or [])}")
    train, train_ids = _load(train_cases, "train", preprocess)
    holdout, holdout_ids = _load(holdout_cases, "holdout", preprocess)
    synthetic, synthetic_ids = _load(synthetic_cases, "synthetic", preprocess)
    control, control_ids = _load(control_synthetic or [], "control", preprocess)
    references = {}
    for name, cases in (reference_synthetic or {}).items():
        if len(cases) < 1:
            raise ValueError(f"reference_synthetic[{name!r}]: expected >= 1 synthetic case, found none")
        references[name] = _load(cases, f"reference {name}", preprocess)
    shape = train[0].images.shape
    for role, arrays, ids in (("train", train, train_ids), ("holdout", holdout, holdout_ids),
                              ("synthetic", synthetic, synthetic_ids), ("control", control, control_ids),
                              *((f"reference {n}", a, i) for n, (a, i) in references.items())):
        for a, cid in zip(arrays, ids):
            if a.images.shape != shape:
                raise ValueError(f"{role} case {cid}: images of shape {a.images.shape}, expected {shape} (the "
                                 f"first training case's); pass preprocess= to bring all cases to one shape")
    train_n, holdout_n, synthetic_n = normalised(train), normalised(holdout), normalised(synthetic)
    stack = lambda arrs: np.stack([a.images for a in arrs])  # noqa: E731
    v_train, v_hold, v_syn = SSIMVolumes(stack(train_n)), SSIMVolumes(stack(holdout_n)), SSIMVolumes(stack(synthetic_n))

    # (a) the paper's attack: best SSIM to any synthetic case
    s_ts = ssim_matrix(v_train, v_syn, progress=progress, desc="SSIM train x synthetic")
    s_hs = ssim_matrix(v_hold, v_syn, progress=progress, desc="SSIM holdout x synthetic")
    member, nonmember = s_ts.max(axis=1), s_hs.max(axis=1)
    membership = attack_metrics(member, nonmember, n_bootstrap=n_bootstrap,
                                rng=numpy_generator(seed, "privacy", "membership"))
    underpowered = membership["n_members"] < CERTIFY_N or membership["n_nonmembers"] < CERTIFY_N
    membership.update(above_chance=membership["ci_low"] > 0.5, underpowered=underpowered,
                      certifies_auc_below_0_55=(not underpowered) and membership["ci_high"] < 0.55)

    # (a') reference control: the same attack against generators that never saw this site's cases
    reference = None
    if references:
        by_generator, ref_scores = {}, []
        for name, (arrays, _) in references.items():
            v_ref = SSIMVolumes(stack(normalised(arrays)))
            m_ref = ssim_matrix(v_train, v_ref, progress=progress, desc=f"SSIM train x reference {name}").max(axis=1)
            h_ref = ssim_matrix(v_hold, v_ref, progress=progress, desc=f"SSIM holdout x reference {name}").max(axis=1)
            by_generator[name] = attack_metrics(m_ref, h_ref, n_bootstrap=n_bootstrap,
                                                rng=numpy_generator(seed, "privacy", "reference", name))
            by_generator[name]["n_synthetic"] = len(arrays)
            ref_scores.append((m_ref, h_ref))
        auc_mean = float(np.mean([r["auc"] for r in by_generator.values()]))
        # paired bootstrap: the same resampled members and non-members for the attack and its references
        rng = numpy_generator(seed, "privacy", "reference-excess")
        boots = []
        for _ in range(int(n_bootstrap)):
            i, j = rng.integers(0, member.size, member.size), rng.integers(0, nonmember.size, nonmember.size)
            boots.append(auc_score(member[i], nonmember[j]) - np.mean([auc_score(m[i], h[j]) for m, h in ref_scores]))
        lo, hi = np.percentile(boots, [2.5, 97.5])
        reference = {"by_generator": by_generator, "auc_mean": auc_mean,
                     "excess_auc": float(membership["auc"] - auc_mean), "excess_ci_low": float(lo),
                     "excess_ci_high": float(hi), "excess_above_zero": bool(lo > 0)}

    # (b) negative control: members vs members
    rng = numpy_generator(seed, "privacy", "negative-control")
    perm = rng.permutation(len(train))
    half_a, half_b = perm[: len(train) // 2], perm[len(train) // 2:]
    negative = attack_metrics(member[half_a], member[half_b], n_bootstrap=n_bootstrap, rng=rng)
    # The bootstrap percentile CI collapses on a handful of cases (1 vs 2 members gives [1, 1] whenever the
    # scores happen to separate), so a split that is not significantly off chance (exact test) also passes.
    negative["ci_covers_chance"] = bool(negative["ci_low"] <= 0.5 <= negative["ci_high"])
    negative["ok"] = bool(negative["ci_covers_chance"] or negative["p_value"] >= 0.05)
    negative["split"] = "random halves of the training cases, both scored against the synthetic cases"

    # (d) copy rate: nearest training case of each synthetic case vs the held-out reference
    s_ht = ssim_matrix(v_hold, v_train, progress=progress, desc="SSIM holdout x train")
    copies = copy_rate(1.0 - s_ts.T, 1.0 - s_ht, copy_percentile)
    order = np.argsort(np.asarray(copies["nearest_distance"]), kind="stable")[: int(montage_k)]
    closest = [{"synthetic": synthetic_ids[j], "train": train_ids[copies["nearest_train"][j]],
                "distance": float(copies["nearest_distance"][j])} for j in order]

    # (c) positive control: a "generator" that memorised a few training cases
    rng = numpy_generator(seed, "privacy", "positive-control")
    n_pc = int(positive_n_cases) if positive_n_cases is not None else min(5, len(train))
    if not 1 <= n_pc <= len(train):
        raise ValueError(f"positive_n_cases must be in [1, {len(train)}], found {positive_n_cases}")
    pc_idx = np.sort(rng.choice(len(train), size=n_pc, replace=False))
    memorised = normalised(make_memorising_set([train[i] for i in pc_idx], copies_per_case=positive_copies_per_case,
                                               noise_std=positive_noise_std,
                                               intensity_jitter=positive_intensity_jitter, rng=rng))
    v_mem = SSIMVolumes(stack(memorised))
    s_tm = ssim_matrix(v_train, v_mem, progress=progress, desc="SSIM train x control")
    s_hm = ssim_matrix(v_hold, v_mem, progress=progress, desc="SSIM holdout x control")
    positive = attack_metrics(s_tm[pc_idx].max(axis=1), s_hm.max(axis=1), n_bootstrap=n_bootstrap, rng=rng)
    positive["caught"] = bool(positive["auc"] >= caught_auc and positive["ci_low"] > 0.5)
    positive["auc_all_members"] = auc_score(s_tm.max(axis=1), s_hm.max(axis=1))
    positive["memorised_case_ids"] = [train_ids[i] for i in pc_idx]
    positive.update(copies_per_case=int(positive_copies_per_case), noise_std=float(positive_noise_std),
                    intensity_jitter=float(positive_intensity_jitter))
    positive["copy_rate"] = copy_rate(1.0 - s_tm.T, 1.0 - s_ht, copy_percentile)["rate"]

    # (e) generator positive control: a real generator over-fitted to a few training cases
    generator_control = None
    if control_synthetic is not None:
        plain = [c.case_id if isinstance(c, CaseRecord) else tid for c, tid in zip(train_cases, train_ids)]
        index = {}
        for i, (tid, pid) in enumerate(zip(train_ids, plain)):
            index.setdefault(tid, i)
            index.setdefault(pid, i)
        missing = [c for c in control_case_ids if c not in index]
        if missing:
            raise ValueError(f"control_case_ids: expected ids of training cases, found {missing[:5]} not among them "
                             f"(training cases: {train_ids[:5]}...)")
        gc_idx = np.array(sorted({index[c] for c in control_case_ids}))
        v_ctl = SSIMVolumes(stack(normalised(control)))
        s_tc = ssim_matrix(v_train, v_ctl, progress=progress, desc="SSIM train x generator control")
        s_hc = ssim_matrix(v_hold, v_ctl, progress=progress, desc="SSIM holdout x generator control")
        generator_control = attack_metrics(s_tc[gc_idx].max(axis=1), s_hc.max(axis=1), n_bootstrap=n_bootstrap,
                                           rng=numpy_generator(seed, "privacy", "generator-control"))
        generator_control["caught"] = bool(generator_control["auc"] >= caught_auc and generator_control["ci_low"] > 0.5)
        generator_control["auc_all_members"] = auc_score(s_tc.max(axis=1), s_hc.max(axis=1))
        generator_control["memorised_case_ids"] = [train_ids[i] for i in gc_idx]
        generator_control["n_samples"] = len(control)
        generator_control["copy_rate"] = copy_rate(1.0 - s_tc.T, 1.0 - s_ht, copy_percentile)["rate"]

    montage = None
    if montage_path is not None:
        pairs = [(synthetic_n[j], synthetic_ids[j], train_n[copies["nearest_train"][j]],
                  train_ids[copies["nearest_train"][j]], float(copies["nearest_distance"][j])) for j in order]
        montage = str(draw_closest_pairs(
            pairs, montage_path, threshold=copies["threshold"],
            title=f"{len(pairs)} closest synthetic/training pairs (copy threshold 1 - SSIM < "
                  f"{copies['threshold']:.4f}; copy rate {copies['rate']:.1%})"))

    for key, result in (("membership", membership), ("negative control", negative), ("positive control", positive),
                        ("generator positive control", generator_control)):
        if result is not None:
            log.info("privacy %s: AUC %.3f [%.3f, %.3f]", key, result["auc"], result["ci_low"], result["ci_high"])
    if not negative["ok"]:
        log.warning("privacy audit: the negative control is NOT at chance (AUC %.3f, CI [%.3f, %.3f])",
                    negative["auc"], negative["ci_low"], negative["ci_high"])
    if not positive["caught"]:
        log.warning("privacy audit: the positive control was NOT caught (AUC %.3f)", positive["auc"])
    if generator_control is not None and not generator_control["caught"]:
        log.warning("privacy audit: the generator positive control was NOT caught (AUC %.3f)", generator_control["auc"])
    method = SSIM_METHOD_2D if shape[-1] == 1 else SSIM_METHOD
    result = {
        "method": method if ssim_region == "brain" else method.replace(
            "windowed to [0, 1] per sequence", "windowed to [0, 1] per sequence over the whole grid"),
        "ssim_region": ssim_region,
        "n_train": len(train),
        "n_holdout": len(holdout),
        "n_synthetic": len(synthetic),
        "shape": list(shape),
        "membership": membership,
        "negative_control": negative,
        "positive_control": positive,
        "copy_rate": {k: copies[k] for k in ("rate", "threshold", "percentile", "n_copies", "n_synthetic")}
        | {"closest": closest},
        "montage": montage,
        "negative_control_ok": bool(negative["ok"]),
        "positive_control_caught": bool(positive["caught"]),
    }
    if reference is not None:
        result["reference_control"] = reference
        log.info("privacy reference control (generators that never saw these cases): AUC %.3f (membership %.3f, "
                 "excess %.3f [%.3f, %.3f])", reference["auc_mean"], membership["auc"], reference["excess_auc"],
                 reference["excess_ci_low"], reference["excess_ci_high"])
    if generator_control is not None:
        result["positive_control_generator"] = generator_control
        result["positive_control_generator_caught"] = bool(generator_control["caught"])
    return result
