"""Preprocessed cases shared between the arms and rounds of a run: each case is read and preprocessed once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synthlearn.data.contract import CaseRecord
from synthlearn.data.datasets import CaseDataset
from synthlearn.data.preprocess import PreprocessConfig


class DatasetCache:
    """One :class:`CaseDataset` per set of cases, so arms and rounds preprocess each case once."""

    def __init__(self, preprocess: PreprocessConfig):
        self.preprocess = preprocess
        self._by_case: dict[tuple[str, str, str], tuple[CaseDataset, int]] = {}

    def dataset(self, cases: Sequence[CaseRecord]) -> CasesView:
        """Cases as a dataset view (``len``, ``arrays(i)``); each case is read and preprocessed at most
        once per cache."""
        missing = [c for c in cases if self._key(c) not in self._by_case]
        if missing:
            ds = CaseDataset(missing, self.preprocess)
            for i, c in enumerate(missing):
                self._by_case[self._key(c)] = (ds, i)
        return CasesView([self._by_case[self._key(c)] for c in cases])

    @staticmethod
    def _key(case: CaseRecord) -> tuple[str, str, str]:
        return (case.site, case.case_id, str(case.path))


class CasesView:
    """Cases drawn from one or more :class:`CaseDataset` s, addressed 0..N-1 (what the trainer reads)."""

    def __init__(self, items: list[tuple[CaseDataset, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ds, i = self.items[index]
        return ds.arrays(i)

    def grid_affine(self, index: int) -> np.ndarray:
        """The ``(4, 4)`` affine of case ``index``'s preprocessed grid (:meth:`CaseDataset.grid_affine`)."""
        ds, i = self.items[index]
        return ds.grid_affine(i)


__all__ = ["CasesView", "DatasetCache"]
