"""Tumours of the phantom: labels, class-dependent phenotypes, placement and compartments
(PHANTOM.md, recipe steps 3-5).

Labels follow WHO 2021: the tumour type decides IDH (glioblastoma -> wildtype, astrocytoma and
oligodendroglioma -> mutant) and 1p/19q (oligodendroglioma -> codeleted); grade is 4 for glioblastoma,
2/3 (some 4) for astrocytoma, 2/3 for oligodendroglioma; MGMT is drawn with type-dependent rates
(IDH-mutant tumours are mostly methylated) and has only weak imaging correlates.

Imaging follows the class through a *phenotype* drawn with class-dependent probabilities, never as an
absolute rule: the enhancement pattern (``ring``: necrosis + enhancing rim; ``solid``: enhancing without
necrosis; ``diffuse``: non-enhancing; ``patchy``: non-enhancing with faint enhancing patches), the location
rule (``deep_posterior`` white matter, ``frontal_lateral`` at the GM/WM border, ``frontal_cortical``), the
T2-FLAIR mismatch sign (about 60 % of astrocytomas) and calcification-like foci (most oligodendrogliomas).
About one glioblastoma in ten is non-enhancing and looks like a lower-grade glioma (molecular
glioblastoma), and grade-4 astrocytomas often look like glioblastomas, so classes overlap.

Compartments come from a perturbed ellipsoid distance field ``rho`` (1 at the tumour border) with soft
edges ``S(t) = sigmoid((t - rho) / tau)``; fractions are relative to the brain tissue of a voxel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.data.contract import Labels
from synthlearn.data.phantom.atlas import Atlas

#: Tumour PV channels, in the order they follow the atlas channels in the full PV stack.
TUMOUR_CHANNELS: tuple[str, ...] = ("necrosis", "enhancing", "oedema", "core", "rim", "calcification")

LOOKS = ("ring", "solid", "diffuse", "patchy")
LOCATIONS = ("deep_posterior", "frontal_lateral", "frontal_cortical")

# P(look | type, grade), LOOKS order
_LOOK_P = {
    ("glioblastoma", "4"): (0.83, 0.11, 0.06, 0.00),
    ("astrocytoma", "2"): (0.02, 0.00, 0.90, 0.08),
    ("astrocytoma", "3"): (0.03, 0.02, 0.70, 0.25),
    ("astrocytoma", "4"): (0.45, 0.05, 0.15, 0.35),
    ("oligodendroglioma", "2"): (0.00, 0.00, 0.88, 0.12),
    ("oligodendroglioma", "3"): (0.05, 0.00, 0.62, 0.33),
}
# P(location | type), LOCATIONS order
_LOCATION_P = {
    "glioblastoma": (0.70, 0.25, 0.05),
    "astrocytoma": (0.25, 0.65, 0.10),
    "oligodendroglioma": (0.15, 0.15, 0.70),
}


@dataclasses.dataclass(frozen=True)
class Phenotype:
    """The imaging ground truth of one tumour (all lengths in mm).

    Attributes:
        look: enhancement pattern, one of :data:`LOOKS`.
        location: placement rule, one of :data:`LOCATIONS`.
        radius_mm: radius of the tumour border (``rho = 1``).
        axes: ``(3,)`` relative ellipsoid axes.
        rotation: ``(3, 3)`` ellipsoid orientation.
        irregularity: ``w`` in ``rho = rho0 * (1 + w * smooth noise)``.
        margin: soft-edge width ``tau`` of the tumour border (larger = ill-defined).
        necrosis_k: necrosis for ``rho < k`` (0 = none).
        oedema_extent: oedema up to ``rho = e``.
        oedema_strength: oedema fraction at its strongest.
        mass_strength: ``m`` of the radial mass effect.
        mismatch: T2-FLAIR mismatch sign (FLAIR-dark core, bright rim, T2 bright).
        calcifications: number of calcification-like foci.
        patch_strength: enhancing fraction inside ``patchy`` patches (0 otherwise).
        heterogeneity: amplitude of the smooth intensity field inside the lesion.
        centre_mni: ``(3,)`` tumour centre in MNI mm (atlas space).
    """

    look: str
    location: str
    radius_mm: float
    axes: tuple[float, float, float]
    rotation: np.ndarray
    irregularity: float
    margin: float
    necrosis_k: float
    oedema_extent: float
    oedema_strength: float
    mass_strength: float
    mismatch: bool
    calcifications: int
    patch_strength: float
    heterogeneity: float
    centre_mni: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def summary(self) -> dict:
        """JSON-friendly ground truth (without the rotation matrix)."""
        out = dataclasses.asdict(self)
        out.pop("rotation")
        return {k: (round(v, 3) if isinstance(v, float) else
                    [round(float(x), 2) for x in v] if isinstance(v, tuple) else v) for k, v in out.items()}


def draw_labels(tumor_type: str, rng: np.random.Generator) -> Labels:
    """Molecular labels and grade implied by ``tumor_type`` (WHO 2021), MGMT drawn at type-dependent rates.

    Raises:
        ValueError: unknown tumour type.
    """
    if tumor_type == "glioblastoma":
        return Labels(idh="wildtype", codeletion_1p19q="intact", grade="4", tumor_type=tumor_type,
                      mgmt="methylated" if rng.random() < 0.45 else "unmethylated")
    if tumor_type == "astrocytoma":
        grade = str(rng.choice(["2", "3", "4"], p=[0.45, 0.40, 0.15]))
        return Labels(idh="mutant", codeletion_1p19q="intact", grade=grade, tumor_type=tumor_type,
                      mgmt="methylated" if rng.random() < 0.85 else "unmethylated")
    if tumor_type == "oligodendroglioma":
        grade = str(rng.choice(["2", "3"], p=[0.55, 0.45]))
        return Labels(idh="mutant", codeletion_1p19q="codeleted", grade=grade, tumor_type=tumor_type,
                      mgmt="methylated" if rng.random() < 0.92 else "unmethylated")
    raise ValueError(f"unknown tumour type {tumor_type!r}; expected glioblastoma, astrocytoma or oligodendroglioma")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def draw_phenotype(labels: Labels, rng: np.random.Generator, size_scale: float = 1.0) -> Phenotype:
    """Draw a tumour phenotype given the case's labels (class-dependent, with overlap between classes).

    Args:
        labels: the case's labels (tumor_type and grade are used; MGMT weakly).
        rng: the case's generator.
        size_scale: site multiplier of the radius.

    Returns:
        A :class:`Phenotype` (``centre_mni`` still zero: see :func:`place_tumour`).
    """
    ttype, grade = labels.tumor_type, labels.grade
    look = str(rng.choice(LOOKS, p=_LOOK_P[(ttype, grade)]))
    location = str(rng.choice(LOCATIONS, p=_LOCATION_P[ttype]))
    enhancing_mass = look in ("ring", "solid")
    if enhancing_mass:  # glioblastoma-like: smaller, irregular, big oedema, strong mass effect
        radius = rng.uniform(10, 18)
        irregularity = rng.uniform(0.22, 0.38)
        margin = 0.05
        if look == "ring":
            necrosis_k = rng.uniform(0.6, 0.8)
        else:  # solid: a small necrotic centre in about a third
            necrosis_k = rng.uniform(0.3, 0.45) if rng.random() < 0.3 else 0.0
        oedema_extent = rng.uniform(1.8, 2.8)
        oedema_strength = rng.uniform(0.75, 1.0)
        mass = rng.uniform(0.3, 0.6)
    else:  # lower-grade-like: larger, smoother, thin FLAIR halo
        radius = rng.uniform(14, 24)
        irregularity = rng.uniform(0.06, 0.14)
        margin = rng.uniform(0.04, 0.10)
        necrosis_k = 0.0
        oedema_extent = rng.uniform(1.12, 1.35)
        oedema_strength = rng.uniform(0.45, 0.8)
        mass = rng.uniform(0.15, 0.35)
    heterogeneity = 0.12
    if ttype == "oligodendroglioma":  # ill-defined, heterogeneous
        irregularity = max(irregularity, rng.uniform(0.10, 0.25))
        margin = rng.uniform(0.08, 0.16)
        heterogeneity = 0.2
    if ttype != "glioblastoma" and grade == "3":
        radius *= 1.1
        heterogeneity += 0.04
    if labels.mgmt == "methylated":  # weak, partly random correlate: a little less oedema
        oedema_extent = 1 + (oedema_extent - 1) * rng.uniform(0.75, 1.0)
    p_mismatch = {"astrocytoma": 0.67, "oligodendroglioma": 0.05, "glioblastoma": 0.03}[ttype]
    mismatch = (not enhancing_mass) and rng.random() < p_mismatch
    p_calc = {"oligodendroglioma": 0.7, "astrocytoma": 0.06, "glioblastoma": 0.02}[ttype]
    calcifications = int(rng.integers(2, 7)) if rng.random() < p_calc else 0
    patch_strength = rng.uniform(0.5, 0.9) if look == "patchy" else 0.0
    axes = tuple(float(a) for a in rng.uniform(0.8, 1.2, 3))
    return Phenotype(
        look=look, location=location, radius_mm=float(radius * size_scale), axes=axes,  # type: ignore[arg-type]
        rotation=_random_rotation(rng), irregularity=float(irregularity), margin=float(margin),
        necrosis_k=float(necrosis_k), oedema_extent=float(oedema_extent),
        oedema_strength=float(oedema_strength), mass_strength=float(mass), mismatch=bool(mismatch),
        calcifications=calcifications, patch_strength=float(patch_strength), heterogeneity=float(heterogeneity),
    )


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def place_tumour(atlas: Atlas, phenotype: Phenotype, rng: np.random.Generator) -> np.ndarray:
    """Draw the tumour centre in atlas (MNI mm) space by the phenotype's location rule.

    The rules are soft weights over atlas voxels (MNI mm, PHANTOM.md step 3): ``frontal_lateral``: y > 5,
    |x| > 15, at the GM/WM border; ``frontal_cortical``: y > 5, in cortex-rich tissue, near the surface;
    ``deep_posterior``: deep white matter (wm > 0.6), posterior-weighted. All keep the centre deep enough
    for the tumour to fit mostly inside the brain.

    Returns:
        ``(3,)`` float64 centre in MNI mm.
    """
    stride = max(1, int(round(3.0 / min(atlas.spacing))))  # ~3 mm candidate lattice is plenty
    sl = (slice(None, None, stride),) * 3
    coords = atlas.mni_coords()[(slice(None),) + sl].reshape(3, -1).astype(np.float64)
    gm, wm, csf = (atlas.pv[i][sl].reshape(-1).astype(np.float64) for i in (1, 2, 3))
    depth = atlas.depth_mm[sl].reshape(-1).astype(np.float64)
    x, y = coords[0], coords[1]
    r = phenotype.radius_mm
    tissue = np.clip(1 - csf - atlas.pv[0][sl].reshape(-1), 0, 1)
    if phenotype.location == "frontal_lateral":
        border = np.clip(np.minimum(gm, wm) / 0.3, 0, 1)
        w = _sig((y - 5) / 6) * _sig((np.abs(x) - 15) / 4) * border * _sig((depth - (0.6 * r + 4)) / 2)
    elif phenotype.location == "frontal_cortical":
        cortex = np.clip((gm - 0.3) / 0.3, 0, 1) * (wm > 0.05)
        w = _sig((y - 5) / 6) * _sig((np.abs(x) - 8) / 4) * cortex * _sig((depth - (0.4 * r + 3)) / 2)
    elif phenotype.location == "deep_posterior":
        w = _sig((wm - 0.6) / 0.05) * (0.25 + _sig((-y - 10) / 12)) * _sig((depth - (0.6 * r + 4)) / 2)
    else:
        raise ValueError(f"unknown location rule {phenotype.location!r}; expected one of {LOCATIONS}")
    w = w * tissue
    if not np.isfinite(w).all() or w.sum() <= 0:  # tiny grids: fall back to deep brain tissue
        w = tissue * depth
    i = rng.choice(w.size, p=w / w.sum())
    jitter = rng.uniform(-0.5, 0.5, 3) * np.array(atlas.spacing) * stride
    return coords[:, i] + jitter


def _local_noise(gen: torch.Generator, channels: int, coarse: int, d_mm: torch.Tensor,
                 half_size_mm: float) -> torch.Tensor:
    """Smooth noise on a tumour-centred lattice: ``coarse^3`` N(0, 1) nodes spanning ``+/- half_size_mm``,
    sampled (trilinear) at offsets ``d_mm`` ``(3, X, Y, Z)`` from the centre. Returns ``(channels, X, Y, Z)``."""
    nodes = torch.randn((1, channels, coarse, coarse, coarse), generator=gen)
    grid = (d_mm / half_size_mm).flip(0).permute(1, 2, 3, 0)[None]  # grid_sample wants (z, y, x)
    return F.grid_sample(nodes, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def tumour_fractions(
    phenotype: Phenotype,
    centre_mm: np.ndarray,
    coords_mm: torch.Tensor,
    tissue_pv: torch.Tensor,
    gen: torch.Generator,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tumour compartment fractions in output space (PHANTOM.md step 5).

    Args:
        phenotype: the tumour.
        centre_mm: ``(3,)`` centre in output space (mm).
        coords_mm: ``(3, X, Y, Z)`` output voxel coordinates (mm).
        tissue_pv: ``(4, X, Y, Z)`` warped atlas PV (background, GM, WM, CSF) of the subject.
        gen: torch generator (shape and texture noise).
        rng: numpy generator (calcification foci).

    Returns:
        ``(fractions, heterogeneity)``: ``(6, X, Y, Z)`` float32 shares of the brain tissue of each voxel
        in :data:`TUMOUR_CHANNELS` order (their sum is <= 1), and a ``(X, Y, Z)`` field in ``[-1, 1]``
        (0 outside the lesion) scaled by the phenotype's heterogeneity amplitude.
    """
    shape = tuple(coords_mm.shape[1:])
    p = phenotype
    r = p.radius_mm
    reach = r * max(p.oedema_extent, 1.2) * 1.35 + 6.0  # beyond this, every compartment is ~0
    # work on the bounding box of the lesion only (cheap on 128x192x192 grids)
    lines = (coords_mm[0][:, 0, 0], coords_mm[1][0, :, 0], coords_mm[2][0, 0, :])
    lo_hi = []
    for i, line in enumerate(lines):
        inside = ((line >= centre_mm[i] - reach) & (line <= centre_mm[i] + reach)).nonzero()
        if inside.numel() == 0:
            return torch.zeros((len(TUMOUR_CHANNELS),) + shape), torch.zeros(shape)
        lo_hi.append((int(inside.min()), int(inside.max()) + 1))
    box = tuple(slice(a, b) for a, b in lo_hi)
    c = torch.as_tensor(np.asarray(centre_mm), dtype=torch.float32).view(3, 1, 1, 1)
    d = coords_mm[(slice(None),) + box] - c
    pv = tissue_pv[(slice(None),) + box]
    rot = torch.as_tensor(p.rotation, dtype=torch.float32)
    q = torch.einsum("ji,jxyz->ixyz", rot, d) / (r * torch.tensor(p.axes, dtype=torch.float32).view(3, 1, 1, 1))
    rho0 = q.norm(dim=0)
    noise = _local_noise(gen, 3, 6, d, reach)  # shape, enhancing patches, heterogeneity
    rho = rho0 * (1 + p.irregularity * noise[0])

    def soft(t: float, tau: float) -> torch.Tensor:  # S(t) = 1 inside rho < t
        return torch.sigmoid((t - rho) / tau)

    tau = p.margin
    zeros = torch.zeros_like(rho)
    necrosis, enhancing, core, rim, calc = zeros, zeros, zeros, zeros, zeros
    inner = soft(1.0, tau)
    if p.look == "ring":
        necrosis = soft(p.necrosis_k, tau)
        enhancing = inner - necrosis
    elif p.look == "solid":
        necrosis = soft(p.necrosis_k, tau) if p.necrosis_k > 0 else zeros
        enhancing = inner - necrosis
    elif p.look in ("diffuse", "patchy"):
        if p.mismatch:
            core = soft(0.82, tau)
            rim = inner - core
        else:
            core = inner
        if p.look == "patchy":
            patch = torch.sigmoid((noise[1] - 0.6) / 0.15) * p.patch_strength
            enhancing = inner * patch
            core = core * (1 - patch)
            rim = rim * (1 - patch)
    else:
        raise ValueError(f"unknown look {p.look!r}; expected one of {LOOKS}")
    # oedema: finger-like in white matter, sparing cortex and CSF (less so right next to the tumour)
    brain = (1 - pv[0]).clamp_min(1e-6)
    wm_share = ((pv[2] / brain - 0.25) / 0.5).clamp(0, 1)
    near = soft(1.25, 0.1)
    if p.look in ("ring", "solid"):
        weight = wm_share + (1 - wm_share) * 0.5 * near
    else:
        weight = 0.5 + 0.5 * wm_share
    oedema = (torch.sigmoid((p.oedema_extent - rho) / 0.15) - inner).clamp_min(0) * weight * p.oedema_strength
    if p.calcifications:
        foci = zeros
        for _ in range(p.calcifications):
            u = rng.standard_normal(3)
            u = u / np.linalg.norm(u) * rng.uniform(0, 0.7) ** (1 / 3) * 0.7
            offset = p.rotation @ (np.array(p.axes) * r * u)
            rc = rng.uniform(2.5, 4.0)
            off = torch.as_tensor(offset, dtype=torch.float32).view(3, 1, 1, 1)
            dist = (d - off).norm(dim=0)
            foci = torch.maximum(foci, torch.sigmoid((rc - dist) / 0.8))
        calc = torch.minimum(foci * 0.9, core)
        core = core - calc
    lesion = necrosis + enhancing + core + rim + calc
    hetero = torch.tanh(noise[2]) * p.heterogeneity * (lesion + 0.5 * oedema).clamp(0, 1)
    full = torch.zeros((len(TUMOUR_CHANNELS),) + shape)
    full[(slice(None),) + box] = torch.stack([necrosis, enhancing, oedema, core, rim, calc]).clamp_min(0)
    het_full = torch.zeros(shape)
    het_full[box] = hetero
    return full, het_full


def compose_pv(tissue_pv: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Stack normal and tumour channels; tumour takes its share from the normal tissue channels.

    Args:
        tissue_pv: ``(4, X, Y, Z)`` background, GM, WM, CSF (sum 1).
        fractions: ``(6, X, Y, Z)`` tumour shares of the brain tissue (sum <= 1).

    Returns:
        ``(10, X, Y, Z)`` PV stack (atlas channels then :data:`TUMOUR_CHANNELS`), summing to 1.
    """
    brain = 1 - tissue_pv[0]
    total = fractions.sum(0).clamp(0, 1)
    normal = tissue_pv[1:] * (1 - total)
    return torch.cat([tissue_pv[:1], normal, fractions * brain]).contiguous()


def segmentation(fractions: torch.Tensor, brain_mask: torch.Tensor) -> torch.Tensor:
    """BraTS-convention segmentation from tumour fractions.

    2 oedema where its share > 0.3; 1 necrosis / non-enhancing core where the core-like channels (necrosis,
    core, rim, calcification) plus enhancing exceed 0.5; 3 enhancing where its share >= 0.3 and it is not
    dominated by necrosis. Background outside ``brain_mask``.

    Args:
        fractions: ``(6, X, Y, Z)`` in :data:`TUMOUR_CHANNELS` order.
        brain_mask: ``(X, Y, Z)`` bool.

    Returns:
        ``(X, Y, Z)`` int8 with values 0, 1, 2, 3.
    """
    necrosis, enhancing, oedema, core, rim, calc = fractions
    core_like = necrosis + core + rim + calc
    seg = torch.zeros(fractions.shape[1:], dtype=torch.int8)
    seg[oedema > 0.3] = 2
    seg[core_like + enhancing > 0.5] = 1
    seg[(enhancing >= 0.3) & (enhancing >= 0.7 * necrosis)] = 3
    seg[~brain_mask] = 0
    return seg
