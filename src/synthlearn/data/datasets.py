"""PyTorch datasets over case records.

:class:`CaseDataset` loads each case once (full read, preprocessing of :mod:`synthlearn.data.preprocess`)
and keeps the preprocessed arrays in memory when ``cache`` is set: studies at 32^3-64^3 fit easily and
the training loops then spend their time in the network, not in gzip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from synthlearn.data.contract import CaseRecord
from synthlearn.data.io import read_case
from synthlearn.data.preprocess import PreprocessConfig, preprocess_case_on_grid


class CaseDataset(Dataset):
    """Preprocessed cases.

    Each item is a dict with
        ``image``: ``(4, X, Y, Z)`` float32 tensor (sequences in contract order),
        ``seg``: ``(X, Y, Z)`` int64 tensor (0 bg, 1 necrosis/core, 2 oedema, 3 enhancing; zeros if none),
        ``case_id``, ``site``: str, ``labels``: :class:`synthlearn.data.contract.Labels`, ``index``: int.
    """

    def __init__(self, cases: Sequence[CaseRecord], preprocess: PreprocessConfig, cache: bool = True):
        self.cases = list(cases)
        self.preprocess = preprocess
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._grid: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed ``(image (4, X, Y, Z), seg (X, Y, Z))`` numpy arrays of case ``index``."""
        if index in self._cache:
            return self._cache[index]
        case = self.cases[index]
        arrays = read_case(case)
        seg = arrays.seg if arrays.seg is not None else np.zeros(arrays.images.shape[1:], np.int64)
        image, seg, grid = preprocess_case_on_grid(arrays.images, seg, self.preprocess, affine=arrays.affine)
        self._grid[index] = grid
        if self.cache:
            self._cache[index] = (image, seg)
        return image, seg

    def grid_affine(self, index: int) -> np.ndarray:
        """``(4, 4)`` voxel-to-world affine of case ``index``'s preprocessed grid (its voxel sizes give distances in
        mm, e.g. for HD95)."""
        if index not in self._grid:
            self._cache.pop(index, None)
            self.arrays(index)
        return self._grid[index]

    def __getitem__(self, index: int) -> dict:
        image, seg = self.arrays(index)
        case = self.cases[index]
        return {
            "image": torch.from_numpy(image),
            "seg": torch.from_numpy(seg),
            "case_id": case.case_id,
            "site": case.site,
            "labels": case.labels,
            "index": index,
        }


def collate_cases(items: list[dict]) -> dict:
    """Batch :class:`CaseDataset` items: tensors stacked, the rest kept as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
