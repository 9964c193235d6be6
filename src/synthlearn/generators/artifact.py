"""The generator artifact: what a site ships once to the server.

An artifact folder holds::

    manifest.json               format, config, class names and prevalences, data fingerprint (no case ids),
                                latent shape and scale, training summary and figures, package version,
                                and the size and SHA-256 of every other file
    autoencoder.safetensors     stage-1 autoencoder (encoder + decoder as fine-tuned by stage 2)
    superres.safetensors        stage-2 super-resolution module
    diffusion.safetensors       class-conditioned diffusion UNet (+ class embedding)
    loss_curves.png             training figures (losses only: no image of a training case leaves the site)

Weights are safetensors (tensors only; loading never unpickles anything). :func:`verify_artifact` refuses,
with an error naming the file, an artifact with a missing, changed, truncated or unlisted file, a symlink or a
sub-folder, a listed name that is not a plain ``*.safetensors`` / ``*.png`` file name (``../x``, ``model.pt``,
``evil.pkl``), a file whose content is not what its name says (a pickle renamed ``.safetensors``), or a
manifest that is not a synthlearn generator manifest: all before any weights are read. The manifest carries its
own digest (``manifest_sha256``: the SHA-256 of its canonical JSON without that key), so an edit of any field (the class
names, the latent scale...) is refused too. This is integrity against accidental corruption, incomplete uploads and
edits; it is not a signature (anyone who can rewrite the folder can recompute the digest): authenticity needs a
signed manifest or a trusted transport.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from synthlearn.runinfo import file_sha256

MANIFEST = "manifest.json"
FORMAT = "synthlearn-catphishing-generator"
#: 2: the manifest carries its own digest (``manifest_sha256``); version 1 artifacts (without it) still load
FORMAT_VERSION = 2
DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON (sorted keys, no whitespace), leaving out its own digest."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
WEIGHT_FILES = ("autoencoder.safetensors", "superres.safetensors", "diffusion.safetensors")
#: the only kinds of file an artifact may hold besides its manifest: tensors and figures (nothing that unpickles)
ALLOWED_SUFFIXES = (".safetensors", ".png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: a safetensors header larger than this is refused unread (the library's own limit)
MAX_SAFETENSORS_HEADER = 100_000_000


class ArtifactError(ValueError):
    """An artifact is incomplete, tampered with or not a synthlearn generator artifact."""


def write_artifact(out: str | Path, *, weights: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any],
                   files: dict[str, str | Path] | None = None, replace: bool = False) -> Path:
    """Write an artifact folder atomically (a temporary sibling folder renamed into place).

    Args:
        out: the artifact folder; must not exist or be empty unless ``replace``.
        weights: file name (``*.safetensors``) -> state dict.
        manifest: JSON-able content; ``format``, ``format_version`` and ``files`` are filled in here.
        files: extra files to copy in (name -> source path), e.g. figures.
        replace: remove what ``out`` holds (the training checkpoints) once the new folder is complete.

    Returns:
        The artifact folder.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, state in weights.items():
            if not name.endswith(".safetensors") or "/" in name:
                raise ValueError(f"weight file names must be plain *.safetensors names, found {name!r}")
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / name))
        for name, src in (files or {}).items():
            if "/" in name or name == MANIFEST:
                raise ValueError(f"artifact file names must be plain names other than {MANIFEST}, found {name!r}")
            shutil.copyfile(src, tmp / name)
        listing = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                   for p in sorted(tmp.iterdir()) if p.is_file()}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": listing}
        full = json.loads(json.dumps(full, default=str))  # the digest is of what the file holds
        full[DIGEST_KEY] = manifest_digest(full)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        if out.exists():
            if any(out.iterdir()) and not replace:
                raise FileExistsError(f"{out}: artifact folder is not empty")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def amend_manifest(artifact_dir: str | Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level manifest field of a verified artifact (e.g. the site's ``release_gate`` decision) and
    re-digest the manifest; the files are untouched. The new manifest replaces the old one atomically.

    Raises:
        ArtifactError: the artifact does not verify, or ``key`` is one of the fields the format owns.
        ValueError: ``value`` is not plain JSON (no NaN or infinity).
    """
    root = Path(artifact_dir)
    manifest = verify_artifact(root)
    if key in ("format", "format_version", "files", DIGEST_KEY):
        raise ArtifactError(f"{root / MANIFEST}: {key!r} belongs to the artifact format and cannot be amended")
    manifest[key] = json.loads(json.dumps(value, allow_nan=False))
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{MANIFEST}.", suffix=".tmp")
    os.close(fd)
    try:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact, without checking the files (use :func:`verify_artifact` for that)."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; expected the manifest of a synthlearn generator artifact "
                            f"(made by `synthlearn train-generator`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: expected format {FORMAT!r}, found {found!r}")
    if manifest.get("format_version") not in (1, FORMAT_VERSION):
        raise ArtifactError(f"{path}: expected format_version {FORMAT_VERSION} (or 1), found "
                            f"{manifest.get('format_version')!r}; made by another synthlearn version?")
    if manifest.get("format_version", 1) >= 2:
        found = manifest.get(DIGEST_KEY)
        if found != manifest_digest(manifest):
            raise ArtifactError(f"{path}: the manifest was changed after training: its {DIGEST_KEY} is {found!r} but "
                                f"its content hashes to {manifest_digest(manifest)}; refusing it (re-ship the "
                                f"artifact as written by train-generator)")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: expected a 'files' table with the SHA-256 of every file, found "
                            f"{type(manifest.get('files')).__name__}")
    return manifest


def verify_artifact(artifact_dir: str | Path) -> dict[str, Any]:
    """Check an artifact folder completely; return its manifest. Nothing is deserialised here: weights are only
    hashed, and their safetensors header (JSON) parsed.

    Checks, in order: the folder exists; ``manifest.json`` is a synthlearn generator manifest; the three weight
    files are listed; every listed name is a plain file name ending in one of :data:`ALLOWED_SUFFIXES`; the
    folder holds nothing but the manifest and the listed files, none of them a symlink or a folder; every listed
    file has the listed size and SHA-256; every ``.safetensors`` file is a well-formed safetensors file (not a
    pickle or a ``torch.save`` archive renamed) and every ``.png`` starts with the PNG signature.

    Raises:
        FileNotFoundError: the folder does not exist.
        ArtifactError: naming the first offending file, what was expected and what was found.
    """
    root = Path(artifact_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such artifact folder")
    manifest = read_manifest(root)
    listed = manifest["files"]
    for name in WEIGHT_FILES:
        if name not in listed:
            raise ArtifactError(f"{root / MANIFEST}: expected {name} among the listed files, found "
                                f"{sorted(listed)}")
    for name, info in sorted(listed.items()):
        _check_listed_name(root, name)
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)):
            raise ArtifactError(f"{root / MANIFEST}: listed file {name!r}: expected {{'sha256': str, 'bytes': int}}, "
                                f"found {info!r}")
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            raise ArtifactError(f"{entry}: expected a regular file, found a symlink (to {os.readlink(entry)!r}); "
                                f"an artifact holds only its own files: copy the folder without links")
        if entry.name == MANIFEST:
            continue
        if entry.is_dir():
            raise ArtifactError(f"{entry}: expected only the listed files {sorted(listed)}, found a folder "
                                f"(refusing an artifact with unlisted content)")
        if entry.name not in listed:
            extra = sorted(p.name for p in root.iterdir() if p.name != MANIFEST and p.name not in listed)
            raise ArtifactError(f"{entry}: not listed in {MANIFEST}; expected only the listed files {sorted(listed)}, "
                                f"found extra {extra} (refusing an artifact with unlisted content)")
    for name, info in sorted(listed.items()):
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; the manifest lists it (incomplete artifact: copy the whole folder)")
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{path}: expected {info.get('bytes')} bytes (manifest), found {size} bytes "
                                f"(truncated or changed)")
        digest = file_sha256(path)
        if digest != info.get("sha256"):
            raise ArtifactError(f"{path}: SHA-256 differs from the manifest: expected {info.get('sha256')}, "
                                f"found {digest} (the file was changed after training)")
    for name in sorted(listed):
        _check_content(root / name)
    return manifest


def _check_listed_name(root: Path, name: Any) -> None:
    """Refuse a listed name that is not a plain ``*.safetensors`` / ``*.png`` file name of the folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") or name == MANIFEST
            or any(sep in name for sep in ("/", "\\", "\0")) or Path(name).name != name):
        raise ArtifactError(f"{root / MANIFEST}: listed file name {name!r}: expected a plain file name inside the "
                            f"artifact folder (no '/', '\\', leading '.' or '..'), found a path")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise ArtifactError(f"{root / MANIFEST}: listed file {name!r}: expected only {' or '.join(ALLOWED_SUFFIXES)} "
                            f"files (tensors and figures), found a {Path(name).suffix or 'suffix-less'!s} file; "
                            f"refusing it (pickled weights never cross a site boundary)")


def _sniff(head: bytes) -> str:
    """What a file's first bytes look like, for error messages."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save)"
    if head[:8] == PNG_SIGNATURE:
        return "a PNG image"
    return f"bytes {head[:16]!r}"


def _check_content(path: Path) -> None:
    """Refuse a listed file whose content is not what its suffix says; reads the safetensors header only.

    A safetensors file is ``u64 little-endian N``, ``N`` bytes of a JSON object (tensor name -> ``dtype``,
    ``shape``, ``data_offsets``), then the tensor bytes, which the offsets must cover exactly.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
        if path.suffix == ".png":
            if head[:8] != PNG_SIGNATURE:
                raise ArtifactError(f"{path}: expected a PNG image, found {_sniff(head)}")
            return
        found = _sniff(head)
        if size < 8:
            raise ArtifactError(f"{path}: expected a safetensors file, found {size} bytes")
        n = int.from_bytes(head[:8], "little")
        if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ArtifactError(f"{path}: expected a safetensors file (8-byte header length then a JSON header), "
                                f"found {found} (header length {n} for a file of {size} bytes); refusing it unread")
        fh.seek(8)
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: expected a safetensors file with a JSON header, found {found} "
                                f"({type(exc).__name__}); refusing it unread") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: expected a safetensors JSON header object, found {type(header).__name__}")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)
                or not isinstance(entry.get("shape"), list)):
            raise ArtifactError(f"{path}: tensor {key!r}: expected {{'dtype', 'shape', 'data_offsets'}}, found "
                                f"{entry!r}")
        end = max(end, offsets[1])
    if end != size - 8 - n:
        raise ArtifactError(f"{path}: expected tensor data of {end} bytes after the safetensors header, found "
                            f"{size - 8 - n} bytes")


def load_weights(artifact_dir: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors of one weight file of a verified artifact (safetensors: no pickle is ever loaded)."""
    from safetensors.torch import load_file

    path = Path(artifact_dir) / name
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def artifact_bytes(artifact_dir: str | Path) -> int:
    """Total size of an artifact folder in bytes (what crosses the site boundary)."""
    return sum(p.stat().st_size for p in Path(artifact_dir).iterdir() if p.is_file())
