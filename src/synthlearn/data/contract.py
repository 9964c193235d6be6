"""The synthlearn data contract: typed records for labels, cases, sites and studies.

A study folder (DESIGN.md "Data contract")::

    <study>/study.json                {"sequences": [...], "labels": {...}, "sites": {"tcga": {"role": "train"}, ...}}
    <study>/<site>/labels.csv         case_id, idh, codeletion_1p19q, mgmt, grade, tumor_type (blank = unknown)
    <study>/<site>/<case_id>/{t1,t1c,t2,flair,seg}.nii.gz

A study's channels and label columns are its own: ``study.json`` names the sequences (channel order everywhere,
e.g. ``["t1", "flair"]`` or ``["ct"]``) and the label columns with their values (e.g. ``{"grade": ["low",
"high"]}``); without those keys a study has the glioma defaults, :data:`SEQUENCES` and :data:`LABEL_VALUES`
(:class:`LabelSchema`). Label values are normalised to the schema's spellings (case-insensitive); for the glioma
columns common synonyms (``1``/``0``, ``mut``/``wt``, ``GBM``...) are accepted on reading so that other hospitals'
tables load unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
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


def normalize_label(column: str, raw: str | int | float | None,
                    values: tuple[str, ...] | None = None) -> str | None:
    """Canonical value of ``raw`` for label ``column``, or None when unknown.

    Args:
        column: the label column.
        raw: the value as written in a table.
        values: the column's allowed values (a study's own schema); default: the glioma column's
            :data:`LABEL_VALUES`. Matching is case-insensitive; the glioma synonyms apply when the column keeps its
            glioma values.

    Raises:
        ValueError: when ``raw`` is neither unknown nor a known value or synonym.
    """
    if values is None:
        if column not in LABEL_VALUES:
            raise ValueError(f"unknown label column {column!r}; expected one of {LABEL_COLUMNS}")
        values = LABEL_VALUES[column]
    if raw is None:
        return None
    text = str(raw).strip().lower()
    if text in _UNKNOWN:
        return None
    for value in values:
        if text == value.lower():
            return value
    if tuple(values) == LABEL_VALUES.get(column) and text in _SYNONYMS[column]:
        return _SYNONYMS[column][text]
    raise ValueError(
        f"label {column}={raw!r} is not valid; expected one of {list(values)} (or blank for unknown)"
    )


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class LabelSchema:
    """A study's label columns and each column's allowed values (value order = class index everywhere).

    Attributes:
        columns: ``((column, (value, ...)), ...)`` in table order.
    """

    columns: tuple[tuple[str, tuple[str, ...]], ...] = tuple(LABEL_VALUES.items())

    def __post_init__(self) -> None:
        names = [c for c, _ in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"label columns must be unique, found {names}")
        for column, values in self.columns:
            if not _NAME.match(column) or column == "case_id":
                raise ValueError(f"label column {column!r}: expected a lower-case name of letters, digits and _ "
                                 f"(not case_id)")
            if len(values) < 2 or len({v.lower() for v in values}) != len(values) or not all(
                    isinstance(v, str) and v.strip() and v.strip().lower() not in _UNKNOWN for v in values):
                raise ValueError(f"label column {column!r}: expected at least two distinct non-blank values "
                                 f"(blank means unknown), found {list(values)}")

    @classmethod
    def from_json(cls, table: object) -> LabelSchema:
        """``{"column": ["value", ...], ...}`` (``study.json``'s ``labels``) -> schema.

        Raises:
            ValueError: not such a table, or a column the schema refuses.
        """
        if not isinstance(table, dict) or not table or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in table.values()):
            raise ValueError(f'expected an object of label columns and their values like {{"grade": ["low", "high"]}}, '
                             f"found {str(table)[:200]}")
        return cls(tuple((str(k), tuple(v)) for k, v in table.items()))

    def to_json(self) -> dict[str, list[str]]:
        return {c: list(v) for c, v in self.columns}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def values(self, column: str) -> tuple[str, ...]:
        """The values of ``column``.

        Raises:
            KeyError: ``column`` is not in the schema (the message lists the columns).
        """
        for c, v in self.columns:
            if c == column:
                return v
        raise KeyError(f"label column {column!r} is not in this study; its columns: {list(self.names)}")

    def __contains__(self, column: object) -> bool:
        return column in self.names

    def normalize(self, column: str, raw: str | float | None) -> str | None:
        """:func:`normalize_label` with this schema's values."""
        return normalize_label(column, raw, self.values(column))


#: The glioma label columns of the default study.
GLIOMA_LABELS = LabelSchema()


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


class Labels:
    """A case's labels: label column -> canonical value; a column not set is unknown (None: masked in training and
    evaluation). Immutable and hashable.

    ``Labels(idh="mutant", grade="2")`` or ``Labels({"ki67": "high"})``; the glioma columns read as attributes
    (``labels.idh``), any column with :meth:`get`.
    """

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, str | None] | None = None, /, **columns: str | None):
        merged = {**(values or {}), **columns}
        object.__setattr__(self, "_items", tuple(sorted((str(k), str(v)) for k, v in merged.items()
                                                        if v is not None)))

    def get(self, column: str) -> str | None:
        """The value of ``column``, or None when unknown (or not a column of this case's study)."""
        for k, v in self._items:
            if k == column:
                return v
        return None

    def __getattr__(self, name: str) -> str | None:
        if name in LABEL_VALUES:  # the glioma columns as attributes
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}; read a label column with .get()")

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def items(self) -> tuple[tuple[str, str], ...]:
        """The known ``(column, value)`` pairs, sorted by column."""
        return self._items

    def as_row(self, columns: Sequence[str] = LABEL_COLUMNS) -> dict[str, str]:
        """``column -> value`` ('' = unknown) for a labels.csv row."""
        return {c: (self.get(c) or "") for c in columns}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Labels) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Labels({', '.join(f'{k}={v!r}' for k, v in self._items)})"

    def __reduce__(self):
        return (Labels, (dict(self._items),))


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One case on disk: its four sequence files, its segmentation and its labels.

    Attributes:
        case_id: identifier unique within the site.
        site: the site name.
        images: sequence name -> NIfTI path, keys in the study's sequence order (:data:`SEQUENCES` by default; a
            missing file keeps its expected path; :mod:`synthlearn.data.verify` reports it).
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

    @property
    def sequences(self) -> tuple[str, ...]:
        """The case's sequences in channel order."""
        return tuple(self.images)

    def with_sequences(self, sequences: Sequence[str]) -> CaseRecord:
        """The same case with its images restricted to (and ordered as) ``sequences``, e.g. a model's channels.

        Raises:
            ValueError: the case lacks one of ``sequences`` (names the case folder, what was expected and found).
        """
        sequences = tuple(sequences)
        if sequences == self.sequences:
            return self
        missing = [s for s in sequences if s not in self.images]
        if missing:
            raise ValueError(f"{self.path or self.case_id}: expected sequences {list(sequences)}, found "
                             f"{list(self.sequences)} (missing {missing})")
        return dataclasses.replace(self, images={s: self.images[s] for s in sequences})

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
    labels: LabelSchema = GLIOMA_LABELS
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
