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
with an error naming the file, an artifact with a missing, changed, truncated or unlisted file, or a
manifest that is not a synthlearn generator manifest. It checks integrity against accidental corruption
and incomplete uploads; it is not a signature (anyone who can rewrite the folder can rewrite the manifest):
authenticity needs a signed manifest or a trusted transport.
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
FORMAT_VERSION = 1
WEIGHT_FILES = ("autoencoder.safetensors", "superres.safetensors", "diffusion.safetensors")


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
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: expected format_version {FORMAT_VERSION}, found "
                            f"{manifest.get('format_version')!r}; made by another synthlearn version?")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: expected a 'files' table with the SHA-256 of every file, found "
                            f"{type(manifest.get('files')).__name__}")
    return manifest


def verify_artifact(artifact_dir: str | Path) -> dict[str, Any]:
    """Check an artifact folder completely; return its manifest.

    Checks: the folder exists; ``manifest.json`` is a synthlearn generator manifest; every file it lists
    exists with the listed size and SHA-256; the three weight files are listed; no file or folder is
    present that the manifest does not list.

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
        path = root / name
        if "/" in name or name.startswith("."):
            raise ArtifactError(f"{root / MANIFEST}: listed file name {name!r} is not a plain file name")
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
    extra = sorted(p.name for p in root.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        raise ArtifactError(f"{root / extra[0]}: not listed in {MANIFEST}; expected only the listed files "
                            f"{sorted(listed)}, found extra {extra} (refusing an artifact with unlisted content)")
    return manifest


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


class LoadedGenerator:
    """A verified artifact's networks, ready to sample (eval mode, on ``device``).

    Attributes:
        cfg: the :class:`synthlearn.training.generator.GeneratorConfig` it was trained with.
        manifest: the manifest.
        autoencoder: :class:`synthlearn.models.autoencoder.GeneratorAutoencoder`.
        superres: :class:`synthlearn.models.superres.SuperResolution`.
        diffusion: :class:`synthlearn.models.diffusion.ClassConditionedUNet`.
    """

    def __init__(self, cfg, manifest: dict[str, Any], autoencoder, superres, diffusion):
        self.cfg = cfg
        self.manifest = manifest
        self.autoencoder = autoencoder
        self.superres = superres
        self.diffusion = diffusion

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def latent_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, scale)`` ``(C,)`` each: the diffusion model saw ``(z - shift) * scale``
        (:func:`synthlearn.training.generator.latent_norm_tensors`)."""
        from synthlearn.training.generator import latent_norm_tensors

        return latent_norm_tensors(self.manifest, self.cfg.autoencoder.latent_channels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_channels, *latent_shape)`` at the autoencoder's scale -> ``(B, 5, *shape)``; ``classes``
        ``(B,)`` (the conditioned class of each latent) is needed when the decoder is class-conditional."""
        return self.superres(self.autoencoder.decode(latents, classes))


def load_generator(artifact_dir: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Verify an artifact (:func:`verify_artifact`) and build its networks from the manifest's config.

    Raises:
        FileNotFoundError / ArtifactError: naming the offending file.
    """
    from synthlearn.config import ConfigError, from_dict
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.models.diffusion import ClassConditionedUNet
    from synthlearn.models.superres import SuperResolution
    from synthlearn.training.generator import GeneratorConfig

    root = Path(artifact_dir)
    manifest = verify_artifact(root)
    try:
        config = manifest["config"]
        if isinstance(config.get("diffusion"), dict) and "class_in_timestep" not in config["diffusion"]:
            # written before the option existed (synthlearn 0.1 artifacts): cross-attention conditioning only
            config = {**config, "diffusion": {**config["diffusion"], "class_in_timestep": False}}
        cfg = from_dict(GeneratorConfig, config)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root / MANIFEST}: 'config' is not a valid generator config ({exc})") from exc
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape, len(cfg.class_names), cfg.channels)
    sr = SuperResolution(cfg.superres, cfg.shape, cfg.channels)
    dm = ClassConditionedUNet(cfg.diffusion, cfg.autoencoder.latent_channels, len(cfg.class_names))
    for module, name in ((ae.ae, "autoencoder.safetensors"), (sr, "superres.safetensors"),
                         (dm, "diffusion.safetensors")):
        state = load_weights(root, name)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{root / name}: weights do not fit the network of the manifest's config "
                                f"({str(exc).splitlines()[0]})") from exc
    for module in (ae, sr, dm):
        module.to(device).eval()
    return LoadedGenerator(cfg, manifest, ae, sr, dm)
