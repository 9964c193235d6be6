"""The synthlearn data contract: typed records for labels, cases, sites and studies.

A study folder (DESIGN.md "Data contract")::

    <study>/study.json                {"sequences": [...], "labels": {...}, "sites": {"tcga": {"role": "train"}, ...}}
    <study>/<site>/labels.csv         case_id, idh, codeletion_1p19q, mgmt, grade, tumor_type (blank = unknown)
    <study>/<site>/<case_id>/{t1,t1c,t2,flair,seg}.nii.gz

Label values are normalised to the canonical spellings in :data:`LABEL_VALUES`; common synonyms (``1``/``0``,
``mut``/``wt``, ``GBM``...) are accepted on reading so that other hospitals' tables load unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

#: The four MRI sequences, in channel order everywhere in synthlearn.
SEQUENCES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")

#: Segmentation labels of the data contract (BraTS convention with enhancing = 3):
#: 0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing tumour.
SEG_VALUES: tuple[int, ...] = (0, 1, 2, 3)

#: Canonical label values per label column (None = unknown).
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "idh": ("wildtype", "mutant"),
    "codeletion_1p19q": ("intact", "codeleted"),
    "mgmt": ("unmethylated", "methylated"),
    "grade": ("2", "3", "4"),
    "tumor_type": ("glioblastoma", "astrocytoma", "oligodendroglioma"),
}
LABEL_COLUMNS: tuple[str, ...] = tuple(LABEL_VALUES)

_SYNONYMS: dict[str, dict[str, str]] = {
    "idh": {"0": "wildtype", "wt": "wildtype", "wild-type": "wildtype", "idh-wildtype": "wildtype",
            "negative": "wildtype", "1": "mutant", "mut": "mutant", "mutated": "mutant",
            "idh-mutant": "mutant", "positive": "mutant"},
    "codeletion_1p19q": {"0": "intact", "non-codeleted": "intact", "noncodeleted": "intact", "no": "intact",
                         "1": "codeleted", "co-deleted": "codeleted", "yes": "codeleted"},
    "mgmt": {"0": "unmethylated", "1": "methylated", "un-methylated": "unmethylated"},
    "grade": {"ii": "2", "iii": "3", "iv": "4", "2.0": "2", "3.0": "3", "4.0": "4",
              "g2": "2", "g3": "3", "g4": "4"},
    # no numeric codes: there is no standard order of tumour types (0/1/2 would silently mean what we chose)
    "tumor_type": {"gbm": "glioblastoma", "astro": "astrocytoma", "oligo": "oligodendroglioma"},
}
_UNKNOWN = {"", "na", "n/a", "nan", "none", "unknown", "?", "-"}


def normalize_label(column: str, raw: str | int | float | None) -> str | None:
    """Canonical value of ``raw`` for label ``column``, or None when unknown.

    Raises:
        ValueError: when ``raw`` is neither unknown nor a known value or synonym.
    """
    if column not in LABEL_VALUES:
        raise ValueError(f"unknown label column {column!r}; expected one of {LABEL_COLUMNS}")
    if raw is None:
        return None
    text = str(raw).strip().lower()
    if text in _UNKNOWN:
        return None
    if text in LABEL_VALUES[column]:
        return text
    if text in _SYNONYMS[column]:
        return _SYNONYMS[column][text]
    raise ValueError(
        f"label {column}={raw!r} is not valid; expected one of {list(LABEL_VALUES[column])} (or blank for unknown)"
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem found in a study: where, which check, what was expected and what was found."""

    site: str
    case_id: str
    file: str
    check: str
    expected: str
    found: str

    def __str__(self) -> str:
        where = "/".join(p for p in (self.site, self.case_id) if p) or "study"
        return f"[{self.check}] {where}: {self.file}: expected {self.expected}; found {self.found}"


@dataclasses.dataclass(frozen=True)
class Labels:
    """A case's labels; None means unknown (masked in training and evaluation)."""

    idh: str | None = None
    codeletion_1p19q: str | None = None
    mgmt: str | None = None
    grade: str | None = None
    tumor_type: str | None = None

    def get(self, column: str) -> str | None:
        if column not in LABEL_VALUES:
            raise ValueError(f"unknown label column {column!r}; expected one of {LABEL_COLUMNS}")
        return getattr(self, column)

    def as_row(self) -> dict[str, str]:
        return {c: (getattr(self, c) or "") for c in LABEL_COLUMNS}


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One case on disk: its four sequence files, its segmentation and its labels.

    Attributes:
        case_id: identifier unique within the site.
        site: the site name.
        images: sequence name -> NIfTI path, keys in :data:`SEQUENCES` order (a missing file keeps its
            expected path; :mod:`synthlearn.data.verify` reports it).
        seg: segmentation NIfTI path (None when the layout has none, e.g. unlabelled external cases).
        labels: the case's labels.
        seg_values: allowed values in the segmentation file as stored (BraTS-2021 folders use 4 for
            enhancing); :func:`synthlearn.data.io.read_case` maps them to :data:`SEG_VALUES`.
        path: the case folder.
    """

    case_id: str
    site: str
    images: dict[str, Path]
    seg: Path | None
    labels: Labels
    seg_values: tuple[int, ...] = SEG_VALUES
    seg_map: tuple[tuple[int, int], ...] = ()
    path: Path | None = None

    def files(self) -> dict[str, Path]:
        out = dict(self.images)
        if self.seg is not None:
            out["seg"] = self.seg
        return out


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    """A site: name, role in the study (``train`` / ``test`` / ``external``), cases."""

    name: str
    role: str
    cases: tuple[CaseRecord, ...]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.cases)


@dataclasses.dataclass(frozen=True)
class Study:
    """A multi-site study as read from disk by :func:`synthlearn.data.study.open_study`."""

    root: Path
    sites: tuple[SiteRecord, ...]
    sequences: tuple[str, ...] = SEQUENCES
    layout: str = "contract"
    problems: tuple[Problem, ...] = ()  # structural problems found while reading (verify reports them)

    def site(self, name: str) -> SiteRecord:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"site {name!r} not in study {self.root}; sites: {[s.name for s in self.sites]}")

    def sites_with_role(self, role: str) -> tuple[SiteRecord, ...]:
        return tuple(s for s in self.sites if s.role == role)

    @property
    def cases(self) -> tuple[CaseRecord, ...]:
        return tuple(c for s in self.sites for c in s.cases)
