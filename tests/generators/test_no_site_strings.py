"""Nothing that leaves a site, or that the server makes from it, names the site's folder, a case or a patient.

Checked on what crosses the boundary and what the server writes: the CATphishing artifact (``train-generator``) and
the synthetic cases made from it (``synthesize``), and a study written by AsynDGAN/FedGAN's
``write_synthetic_study``. Every text field of every NIfTI header (the fixed string fields ``descrip``, ``aux_file``,
``intent_name``, ``db_name``, ``data_type`` and any header extension), every JSON and CSV file, the JSON header of
every safetensors file and the bytes of every figure must be free of the training site's absolute path, its folder
name used as a path, every training case id and the word "patient".
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthlearn.data.layouts import open_study


def _forbidden(site_dirs) -> list[str]:
    """The strings no output may hold: the sites' paths (as given and resolved), their study's path, each site's
    folder name as a path component, every case id found in the sites' folders, and 'patient'."""
    words = ["patient"]
    for site_dir in map(Path, site_dirs):
        words += [str(site_dir), str(site_dir.resolve()), str(site_dir.parent.resolve()),
                  f"{site_dir.name}/", f"/{site_dir.name}", f"{site_dir.name}\\"]
        words += [p.name for p in site_dir.iterdir() if p.is_dir()]
    assert len(words) > 10, words  # the sites' case ids were found
    return words


def _nifti_texts(path: Path) -> dict[str, str]:
    """Every text a NIfTI header can hold: its fixed string fields and its extensions."""
    header = nib.load(str(path)).header
    texts = {name: bytes(header[name]).decode("latin-1") for name in header.structarr.dtype.names
             if header.structarr.dtype[name].kind == "S"}
    assert {"descrip", "aux_file", "intent_name", "db_name"} <= set(texts)
    for i, ext in enumerate(header.extensions):
        texts[f"extension {i} (code {ext.get_code()})"] = bytes(ext.get_content()).decode("latin-1")
    return texts


def _texts(folder: Path) -> dict[str, str]:
    """``where -> text`` for every file under ``folder`` that can carry a string."""
    out: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if path.name.endswith((".nii", ".nii.gz")):
            out.update({f"{rel} header {k}": v for k, v in _nifti_texts(path).items()})
        elif path.suffix in (".json", ".csv", ".txt", ".tsv"):
            out[str(rel)] = path.read_text()
        elif path.suffix == ".safetensors":
            data = path.read_bytes()
            out[f"{rel} header"] = data[8:8 + int.from_bytes(data[:8], "little")].decode()
        elif path.suffix == ".png":
            out[str(rel)] = path.read_bytes().decode("latin-1")  # text chunks are stored uncompressed
        else:
            pytest.fail(f"{rel}: a kind of file this check does not read; add it")
    return out


def _leaks(folder: Path, forbidden: list[str]) -> list[str]:
    texts = _texts(folder)
    assert texts
    return [f"{where}: holds {word!r}" for where, text in texts.items() for word in forbidden
            if word.lower() in text.lower()]


def test_generator_artifact_and_synthetic_cases_name_no_site_case_or_patient(tiny_artifact, tmp_path):
    from synthlearn.generators.ldm.sample import synthesize

    site_dir, artifact = tiny_artifact
    forbidden = _forbidden([site_dir])
    out = synthesize(artifact, per_class=1, out=tmp_path / "synthetic", seed=0, progress=False)
    assert len(list(out.glob("*/seg.nii.gz"))) == 2  # one case per class
    assert set(_texts(artifact)) >= {"manifest.json", "diffusion.safetensors header", "loss_curves.png"}
    assert _leaks(artifact, forbidden) == []
    assert _leaks(out, forbidden) == []


def test_a_written_synthetic_study_names_no_site_case_or_patient(tiny_study_2d, tmp_path):
    from synthlearn.data.preprocess import PreprocessConfig
    from synthlearn.models.classifier import ClassifierConfig
    from synthlearn.strategies.asyndgan import write_synthetic_study
    from synthlearn.tasks.setup import TrainingSetup
    from synthlearn.training.trainer import TrainConfig

    sites = list(open_study(tiny_study_2d).sites)
    setup = TrainingSetup(task="idh", n_folds=1, seed=0, preprocess=PreprocessConfig(shape=(32, 32)),
                          model=ClassifierConfig(channels=(4, 8), norm_num_groups=4, mamba=False),
                          train=TrainConfig(epochs=1, batch_size=2))
    rng = np.random.default_rng(0)
    samples = [(rng.random((4, 32, 32), dtype=np.float32), (rng.random((32, 32)) > 0.8).astype(np.uint8),
                np.array([k % 2])) for k in range(3)]
    cases = write_synthetic_study(samples, setup, tmp_path / "syn")
    assert len(cases) == 3
    assert _leaks(tmp_path / "syn", _forbidden([s.path for s in sites])) == []


def test_the_check_finds_a_planted_leak(tiny_study_2d, tmp_path):
    """Positive control: a site path in a NIfTI description, a case id in an extension and 'Patient' in a CSV are
    each found."""
    from synthlearn.data.io import save_nifti

    site = open_study(tiny_study_2d).sites[0]
    case_id = site.cases[0].case_id
    save_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4), description=f"{site.path}"[-80:])
    img = nib.load(str(tmp_path / "a.nii.gz"))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", case_id.encode()))
    nib.save(img, str(tmp_path / "b.nii.gz"))
    (tmp_path / "labels.csv").write_text("case_id,idh\nPatient-1,mutant\n")
    (tmp_path / "info.json").write_text(json.dumps({"source": f"data/{site.path.name}/x"}))
    leaks = _leaks(tmp_path, _forbidden([site.path]))
    assert any(m.startswith("a.nii.gz header descrip") for m in leaks), leaks
    assert any(m.startswith("b.nii.gz header extension") and case_id in m for m in leaks), leaks
    assert any(m.startswith("labels.csv") and "patient" in m for m in leaks), leaks
    assert any(m.startswith("info.json") for m in leaks), leaks
