"""Reading a study from disk in any supported layout.

:func:`open_study` recognises, in this order:

1. ``contract``: a folder with ``study.json`` (DESIGN.md "Data contract");
2. ``brats``: a BraTS-2021 style folder, ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (``.nii`` too)
   with an optional ``labels.csv`` beside the case folders, read as one site; labels 1/2/4 are mapped to
   the contract's 1/2/3;
3. ``site``: one site folder of the contract (``<case>/{t1,t1c,t2,flair,seg}.nii.gz`` and optional
   ``labels.csv``), e.g. what ``synthesize`` writes, or a folder of unlabelled cases;
4. ``sites``: a folder of such site folders without ``study.json`` (every site has role ``external``).

:func:`open_case` reads a single case folder in either file naming (``synthlearn predict``).

Reading is cheap (no arrays are loaded). Structural problems (a missing file, a labels.csv row with an
invalid value or without a case folder) do not raise: they are collected in ``Study.problems`` and
:func:`synthlearn.data.verify.verify_study` reports them with the array checks. Code that needs a clean
study calls ``verify_study`` first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from synthlearn.data.contract import (
    GLIOMA_LABELS,
    SEG_VALUES,
    SEQUENCES,
    CaseRecord,
    Labels,
    LabelSchema,
    Problem,
    SiteRecord,
    Study,
)
from synthlearn.data.io import NIFTI_SUFFIXES, find_nifti, read_labels_csv

ROLES = ("train", "test", "external")
BRATS_SEQUENCE_NAMES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
BRATS_SEG_VALUES = (0, 1, 2, 4)
_SEQUENCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class StudyLayoutError(ValueError):
    """The folder is not a study in any supported layout."""


def _is_contract_case(folder: Path, sequences: tuple[str, ...] = SEQUENCES) -> bool:
    return any(find_nifti(folder, s) for s in (*sequences, "seg"))


def _brats_file(folder: Path, name: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{folder.name}_{name}{suffix}"
        if p.is_file():
            return p
    return None


def _is_brats_case(folder: Path) -> bool:
    return any(_brats_file(folder, n) for n in (*BRATS_SEQUENCE_NAMES.values(), "seg"))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_labels(site: str, site_dir: Path, required: bool, problems: list[Problem],
                 schema: LabelSchema = GLIOMA_LABELS) -> dict[str, Labels]:
    """labels.csv of a site -> case_id -> Labels over ``schema``'s columns; invalid values become problems (and
    unknown)."""
    path = site_dir / "labels.csv"
    if not path.is_file():
        if required:
            problems.append(Problem(site, "", str(path), "labels", "a labels.csv with case_id and label columns",
                                    "no such file"))
        return {}
    try:
        rows, header = read_labels_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(Problem(site, "", str(path), "labels", "a readable CSV", f"{type(exc).__name__}: {exc}"))
        return {}
    if "case_id" not in header:
        problems.append(Problem(site, "", str(path), "labels", "a case_id column", f"columns {header}"))
        return {}
    if required:
        missing = [c for c in schema.names if c not in header]
        if missing:
            problems.append(Problem(site, "", str(path), "labels", f"columns {list(schema.names)}",
                                    f"missing columns {missing}"))
    out: dict[str, Labels] = {}
    for i, row in enumerate(rows, start=2):
        case_id = row.get("case_id", "")
        if not case_id:
            problems.append(Problem(site, "", f"{path}:{i}", "labels", "a case_id", "an empty case_id"))
            continue
        if case_id in out:
            problems.append(Problem(site, case_id, f"{path}:{i}", "labels", "one row per case",
                                    "a duplicate row"))
        values = {}
        for col in schema.names:
            try:
                values[col] = schema.normalize(col, row.get(col))
            except ValueError:
                problems.append(Problem(site, case_id, f"{path}:{i}", "label-value",
                                        f"{col} in {list(schema.values(col))} or blank",
                                        repr(row.get(col))))
                values[col] = None
        out[case_id] = Labels(**values)
    return out


def _read_contract_site(name: str, role: str, site_dir: Path, labels_required: bool, problems: list[Problem],
                        sequences: tuple[str, ...] = SEQUENCES, schema: LabelSchema = GLIOMA_LABELS) -> SiteRecord:
    labels = _read_labels(name, site_dir, labels_required, problems, schema)
    cases = []
    seen = set()
    for case_dir in _subdirs(site_dir):
        case_id = case_dir.name
        seen.add(case_id)
        images = {}
        for seq in sequences:
            p = find_nifti(case_dir, seq)
            if p is None:
                problems.append(Problem(name, case_id, str(case_dir / f"{seq}.nii.gz"), "missing-file",
                                        f"sequence {seq} ({seq}.nii.gz or {seq}.nii)", "no such file"))
                p = case_dir / f"{seq}.nii.gz"
            images[seq] = p
        seg = find_nifti(case_dir, "seg")
        if seg is None and labels_required:
            problems.append(Problem(name, case_id, str(case_dir / "seg.nii.gz"), "missing-file",
                                    "segmentation seg.nii.gz", "no such file"))
            seg = case_dir / "seg.nii.gz"
        if labels_required and labels and case_id not in labels:
            problems.append(Problem(name, case_id, str(site_dir / "labels.csv"), "labels",
                                    f"a row for case {case_id}", "no row"))
        cases.append(CaseRecord(case_id=case_id, site=name, images=images, seg=seg,
                                labels=labels.get(case_id, Labels()), path=case_dir))
    for case_id in sorted(set(labels) - seen):
        problems.append(Problem(name, case_id, str(site_dir / "labels.csv"), "labels",
                                f"a case folder {site_dir / case_id}", "a labels.csv row without a case folder"))
    return SiteRecord(name=name, role=role, cases=tuple(cases), path=site_dir)


def _read_brats_site(name: str, role: str, folder: Path, problems: list[Problem]) -> SiteRecord:
    labels = _read_labels(name, folder, False, problems)
    cases = []
    seen = set()
    for case_dir in _subdirs(folder):
        if not _is_brats_case(case_dir):
            continue
        case_id = case_dir.name
        seen.add(case_id)
        images = {}
        for seq, brats_name in BRATS_SEQUENCE_NAMES.items():
            p = _brats_file(case_dir, brats_name)
            if p is None:
                problems.append(Problem(name, case_id, str(case_dir / f"{case_id}_{brats_name}.nii.gz"),
                                        "missing-file", f"sequence {seq} ({case_id}_{brats_name}.nii.gz)",
                                        "no such file"))
                p = case_dir / f"{case_id}_{brats_name}.nii.gz"
            images[seq] = p
        seg = _brats_file(case_dir, "seg")
        cases.append(CaseRecord(case_id=case_id, site=name, images=images, seg=seg,
                                labels=labels.get(case_id, Labels()), seg_values=BRATS_SEG_VALUES,
                                seg_map=((4, 3),), path=case_dir))
    for case_id in sorted(set(labels) - seen):
        problems.append(Problem(name, case_id, str(folder / "labels.csv"), "labels",
                                f"a case folder {folder / case_id}", "a labels.csv row without a case folder"))
    return SiteRecord(name=name, role=role, cases=tuple(cases), path=folder)


def _study_sequences(meta_path: Path, raw: object) -> tuple[str, ...]:
    """``study.json``'s ``sequences``: a non-empty list of distinct lower-case file stems (not ``seg``)."""
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and _SEQUENCE_NAME.match(s) for s in raw) \
            or len(set(raw)) != len(raw) or "seg" in raw:
        raise StudyLayoutError(f"{meta_path}: sequences: expected a non-empty list of distinct lower-case names "
                               f"(the case files' stems, e.g. [\"t1\", \"flair\"]; not \"seg\"), found {raw!r}")
    return tuple(raw)


def _site_name(folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name) or "site"


def open_study(path: str | Path) -> Study:
    """Read the study (or single site) at ``path`` in any supported layout; no arrays are loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StudyLayoutError: the folder matches no layout, or ``study.json`` is malformed.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such study folder")
    if not root.is_dir():
        raise StudyLayoutError(f"{root}: expected a study folder, found a file")
    problems: list[Problem] = []
    meta_path = root / "study.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StudyLayoutError(f"{meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("sites"), dict) or not meta["sites"]:
            raise StudyLayoutError(
                f"{meta_path}: expected an object with a non-empty 'sites' table "
                f'like {{"sites": {{"tcga": {{"role": "train"}}}}}}, found {str(meta)[:200]}'
            )
        sequences = _study_sequences(meta_path, meta.get("sequences", list(SEQUENCES)))
        try:
            schema = LabelSchema.from_json(meta["labels"]) if "labels" in meta else GLIOMA_LABELS
        except ValueError as exc:
            raise StudyLayoutError(f"{meta_path}: labels: {exc}") from exc
        sites = []
        for name, info in meta["sites"].items():
            role = (info or {}).get("role", "train") if isinstance(info, dict) else "?"
            if role not in ROLES:
                problems.append(Problem(name, "", str(meta_path), "study", f"role in {list(ROLES)}", repr(role)))
            site_dir = root / name
            if not site_dir.is_dir():
                problems.append(Problem(name, "", str(site_dir), "missing-file", "a site folder", "no such folder"))
                sites.append(SiteRecord(name=name, role=role, cases=(), path=site_dir))
                continue
            sites.append(_read_contract_site(name, role, site_dir, True, problems, sequences, schema))
        return Study(root=root, sites=tuple(sites), sequences=sequences, layout="contract", labels=schema,
                     problems=tuple(problems))

    subdirs = _subdirs(root)
    if any(_is_brats_case(d) for d in subdirs):
        site = _read_brats_site(_site_name(root), "external", root, problems)
        return Study(root=root, sites=(site,), layout="brats", problems=tuple(problems))
    if any(_is_contract_case(d) for d in subdirs):
        site = _read_contract_site(_site_name(root), "external", root, False, problems)
        return Study(root=root, sites=(site,), layout="site", problems=tuple(problems))
    site_dirs = [d for d in subdirs if any(_is_contract_case(c) or _is_brats_case(c) for c in _subdirs(d))]
    if site_dirs:
        sites = []
        for d in site_dirs:
            if any(_is_brats_case(c) for c in _subdirs(d)):
                sites.append(_read_brats_site(d.name, "external", d, problems))
            else:
                sites.append(_read_contract_site(d.name, "external", d, False, problems))
        return Study(root=root, sites=tuple(sites), layout="sites", problems=tuple(problems))
    raise StudyLayoutError(
        f"{root}: not a study. Expected study.json (synthlearn contract), BraTS-2021 case folders "
        f"(<case>/<case>_t1.nii.gz ...), or case folders with t1/t1c/t2/flair[.nii.gz]; found "
        f"{[p.name for p in sorted(root.iterdir())][:10]}"
    )


def open_case(path: str | Path, site: str = "", *, sequences: tuple[str, ...] = SEQUENCES) -> CaseRecord:
    """Read one case folder, in contract names (``<sequence>.nii.gz``, by default ``t1/t1c/t2/flair[/seg].nii.gz``;
    ``sequences`` names a study's own) or BraTS-2021 names
    (``<case>_t1.nii.gz``, ``<case>_t1ce.nii.gz``, ... ``<case>_seg.nii.gz``, seg 4 mapped to 3); no arrays
    are loaded and the case has no labels.

    A missing sequence keeps its expected path (as in :func:`open_study`), so the reader names it; a missing
    segmentation is ``seg=None``.

    Args:
        path: the case folder.
        site: site name to give the case (default: the parent folder's name).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StudyLayoutError: ``path`` is not a folder or holds no file of either naming.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such case folder")
    if not folder.is_dir():
        raise StudyLayoutError(f"{folder}: expected a case folder, found a file")
    site = site or _site_name(folder.resolve().parent)
    if _is_brats_case(folder):
        case_id = folder.name
        images = {seq: _brats_file(folder, name) or folder / f"{case_id}_{name}.nii.gz"
                  for seq, name in BRATS_SEQUENCE_NAMES.items()}
        return CaseRecord(case_id=case_id, site=site, images=images, seg=_brats_file(folder, "seg"),
                          labels=Labels(), seg_values=BRATS_SEG_VALUES, seg_map=((4, 3),), path=folder)
    if _is_contract_case(folder, sequences):
        images = {seq: find_nifti(folder, seq) or folder / f"{seq}.nii.gz" for seq in sequences}
        return CaseRecord(case_id=folder.name, site=site, images=images, seg=find_nifti(folder, "seg"),
                          labels=Labels(), path=folder)
    raise StudyLayoutError(
        f"{folder}: not a case folder. Expected t1/t1c/t2/flair[/seg].nii.gz or BraTS-2021 names "
        f"{folder.name}_t1.nii.gz, {folder.name}_t1ce.nii.gz, {folder.name}_t2.nii.gz, {folder.name}_flair.nii.gz; "
        f"found {[p.name for p in sorted(folder.iterdir())][:10]}"
    )


def open_site(path: str | Path, *, name: str = "", role: str = "train", sequences: tuple[str, ...] = SEQUENCES,
              labels: LabelSchema = GLIOMA_LABELS) -> SiteRecord:
    """Read one site folder of the contract on its own (``<case>/<sequence>.nii.gz``, ``seg.nii.gz`` and
    ``labels.csv``), as a deployed site does: it knows its own folder and the study's sequences and label columns
    (which the server's protocol names), never the other sites'. No arrays are loaded.

    Args:
        path: the site folder.
        name: the site's name (default: the folder's name).
        sequences, labels: the study's channels and label columns.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StudyLayoutError: it is not a folder, holds no case, or has structural problems (every one listed:
            the file, what was expected and what was found).
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such site folder")
    if not folder.is_dir():
        raise StudyLayoutError(f"{folder}: expected a site folder, found a file")
    problems: list[Problem] = []
    site = _read_contract_site(name or _site_name(folder.resolve()), role, folder, True, problems, tuple(sequences),
                               labels)
    if not site.cases:
        raise StudyLayoutError(f"{folder}: expected case folders with {', '.join(sequences)} and seg images; found "
                               f"{[p.name for p in sorted(folder.iterdir())][:10]}")
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:20])
        raise StudyLayoutError(f"{folder}: {len(problems)} problem(s) in the site folder:\n{listing}")
    return site


def write_study_json(root: str | Path, sites: dict[str, str], *, sequences: tuple[str, ...] = SEQUENCES,
                     labels: LabelSchema = GLIOMA_LABELS) -> None:
    """Write ``study.json`` for ``sites`` (name -> role), its sequences (channel order) and label columns."""
    from synthlearn.data.io import write_json

    for name, role in sites.items():
        if role not in ROLES:
            raise ValueError(f"site {name}: role must be one of {ROLES}, found {role!r}")
    write_json(Path(root) / "study.json", {
        "sequences": list(sequences),
        "seg_values": list(SEG_VALUES),
        "labels": labels.to_json(),
        "sites": {name: {"role": role} for name, role in sites.items()},
    })
