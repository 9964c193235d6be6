"""The partial-volume (PV) brain atlas the phantom warps into subjects (PHANTOM.md, recipe step 1).

Built once from nilearn's MNI ICBM152 2009a template and its grey/white-matter probability maps (1 mm,
197x233x189; they ship inside the nilearn wheel, nothing is downloaded), then cached as ``.npz`` under
``$SYNTHLEARN_CACHE`` (default ``~/.cache/synthlearn``), one file per working grid:

* brain = T1 template > 0; GM and WM maps clipped to the brain; CSF = clip(brain - GM - WM);
  background = 1 - brain;
* the brain's bounding box is centred in a 192 mm cube which is average-pooled to the working grid
  (64^3 -> 3 mm voxels; 128x192x192 -> 1.5 x 1 x 1 mm), so the four PV channels still sum to 1;
* the affine maps voxel indices to MNI millimetres (RAS), so every voxel keeps its MNI coordinates for
  the tumour-location rules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Bump when the build recipe changes: old cache files are then ignored.
ATLAS_VERSION = 1
#: Edge of the cubic field of view in mm (the working grid always spans this cube).
FOV_MM = 192
#: PV channel order of :attr:`Atlas.pv`.
ATLAS_CHANNELS: tuple[str, ...] = ("background", "gm", "wm", "csf")


@dataclasses.dataclass(frozen=True)
class Atlas:
    """A PV atlas on a working grid.

    Attributes:
        pv: ``(4, X, Y, Z)`` float32 partial-volume fractions in :data:`ATLAS_CHANNELS` order, summing to 1.
        affine: ``(4, 4)`` voxel-to-MNI-mm affine (RAS, diagonal, voxel size ``FOV_MM / shape``).
        depth_mm: ``(X, Y, Z)`` float32 distance (mm) from each brain voxel to the nearest non-brain voxel
            (0 outside the brain); used to keep tumour centres inside the brain.
    """

    pv: np.ndarray
    affine: np.ndarray
    depth_mm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.pv.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each axis."""
        return tuple(float(abs(self.affine[i, i])) for i in range(3))  # type: ignore[return-value]

    def mni_coords(self) -> np.ndarray:
        """``(3, X, Y, Z)`` float32 MNI coordinates (mm) of every voxel centre."""
        axes = [self.affine[i, i] * np.arange(n, dtype=np.float64) + self.affine[i, 3]
                for i, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def cache_dir() -> Path:
    """The cache folder: ``$SYNTHLEARN_CACHE`` if set, else ``~/.cache/synthlearn``."""
    env = os.environ.get("SYNTHLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "synthlearn"


def _cache_path(shape: tuple[int, int, int]) -> Path:
    return cache_dir() / f"atlas_mni152_2009a_pv_{shape[0]}x{shape[1]}x{shape[2]}_v{ATLAS_VERSION}.npz"


def _load_mni152_1mm() -> tuple[np.ndarray, np.ndarray]:
    """PV maps of the 1 mm MNI152 2009a template.

    Returns:
        ``(pv, affine)``: ``(4, 197, 233, 189)`` float32 in :data:`ATLAS_CHANNELS` order and the template's
        ``(4, 4)`` affine.
    """
    from nilearn import datasets  # the templates ship inside the nilearn wheel (no download)

    t1_img = datasets.load_mni152_template(resolution=1)
    brain = (np.asarray(t1_img.get_fdata()) > 0).astype(np.float32)
    gm = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32), 0, 1) * brain
    wm = np.clip(np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32), 0, 1) * brain
    tissue = gm + wm
    over = tissue > 1
    gm[over] /= tissue[over]
    wm[over] /= tissue[over]
    csf = np.clip(brain - gm - wm, 0, 1)
    return np.stack([1 - brain, gm, wm, csf]).astype(np.float32), np.asarray(t1_img.affine, np.float64)


def build_atlas(shape: tuple[int, int, int]) -> Atlas:
    """Build the PV atlas for a working grid from the nilearn templates (a few seconds).

    Args:
        shape: ``(X, Y, Z)`` working grid; the grid spans a :data:`FOV_MM` cube, voxel size ``FOV_MM / n``.

    Returns:
        The :class:`Atlas` (not cached; :func:`load_atlas` caches).
    """
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    pv1, aff1 = _load_mni152_1mm()
    brain = pv1[0] < 0.5
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    centre = (lo + hi) // 2  # voxel index of the brain-box centre
    start = centre - FOV_MM // 2
    cube = np.zeros((4, FOV_MM, FOV_MM, FOV_MM), np.float32)
    cube[0] = 1.0  # background outside the template
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + FOV_MM, pv1.shape[1:])
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    cube[:, dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        pv1[:, src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    with torch.no_grad():
        pooled = F.adaptive_avg_pool3d(torch.from_numpy(cube)[None], tuple(shape))[0].numpy()
    pooled = np.clip(pooled, 0, 1)
    pooled /= pooled.sum(0, keepdims=True)
    # world position (mm) of the cube's first 1 mm voxel centre, then of the working voxel centres
    first_mm = aff1[:3, :3] @ start + aff1[:3, 3]
    spacing = np.array([FOV_MM / n for n in shape])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = first_mm - 0.5 + 0.5 * spacing  # corner of the cube + half a working voxel
    depth = ndimage.distance_transform_edt(pooled[0] < 0.5, sampling=spacing).astype(np.float32)
    return Atlas(pv=pooled.astype(np.float32), affine=affine, depth_mm=depth)


def load_atlas(shape: tuple[int, int, int], rebuild: bool = False) -> Atlas:
    """The PV atlas for ``shape``, from the cache or built (and cached) on first use.

    Args:
        shape: ``(X, Y, Z)`` working grid.
        rebuild: build again even if a cached file exists.

    Returns:
        The :class:`Atlas`. An unreadable cache file is rebuilt; a cache folder that cannot be written
        only logs a warning (the atlas is then built on every call).
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    path = _cache_path(shape)  # type: ignore[arg-type]
    if path.is_file() and not rebuild:
        try:
            with np.load(path) as z:
                atlas = Atlas(pv=z["pv"], affine=z["affine"], depth_mm=z["depth_mm"])
            if atlas.shape == shape and atlas.depth_mm.shape == shape:
                return atlas
            log.warning("atlas cache %s has shape %s, expected %s; rebuilding", path, atlas.shape, shape)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("atlas cache %s unreadable (%s); rebuilding", path, exc)
    log.info("building the MNI152 PV atlas for %s (once; cached in %s)", shape, path.parent)
    atlas = build_atlas(shape)  # type: ignore[arg-type]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        os.close(fd)
        try:
            np.savez_compressed(tmp, pv=atlas.pv, affine=atlas.affine, depth_mm=atlas.depth_mm)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot cache the atlas in %s (%s); it will be rebuilt next time", path.parent, exc)
    return atlas
