"""Atomic writers: the files they leave behind are readable by whoever the umask lets read them."""

import os
import stat

import numpy as np
import pytest

from synthlearn.data.io import atomic_write_text, save_nifti, write_json


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        atomic_write_text(tmp_path / "r.md", "# report\n")
        atomic_write_text(tmp_path / "p.csv", "a,b\n")
        save_nifti(tmp_path / "x.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
    finally:
        os.umask(old)
    for name in ("r.json", "r.md", "p.csv", "x.nii.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
