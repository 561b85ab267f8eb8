"""The Hugging Face side of a model artifact: config.json, model.safetensors and the tokenizer files.

The weights are stored under the transformers model's own key names (what `save_pretrained` writes), so
the directory is also an ordinary Hugging Face checkpoint; `to_hf_state_dict` and `from_hf_state_dict`
translate between those keys and `HFClassifier`'s. Reading back is `build_from_config` (config.json only,
built-in architectures only) followed by `load_weights` (safetensors, strict): no pickle, no code from
the directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import SAFE_WEIGHTS_NAME

from fullchain.errors import UserError, one_line
from fullchain.models.hf.classifier import HFClassifier
from fullchain.models.hf.pooling import PooledClassifier

PREFIX = "hf."  # HFClassifier keeps the transformers model as its `hf` submodule


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`HFClassifier` keys -> transformers keys."""
    return {key.removeprefix(PREFIX): tensor for key, tensor in state_dict.items()}


def from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], own_keys: Set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """transformers keys -> wrapper keys: under ``hf.``, except the wrapper's own head (`own_keys`, e.g. the
    ``classifier.*`` of a `PooledClassifier`, which sits beside the base model rather than inside it)."""
    return {key if key in own_keys else PREFIX + key: tensor for key, tensor in state_dict.items()}


def save_weights(directory: Path, model: HFClassifier | PooledClassifier) -> None:
    """Write config.json and model.safetensors of ``model`` into ``directory`` (its tokenizer saves itself)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.hf.config
    config.architectures = [type(model.hf).__name__]
    config.save_pretrained(directory)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in to_hf_state_dict(model.state_dict()).items()}
    save_file(tensors, directory / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})


def load_weights(model: HFClassifier | PooledClassifier, directory: Path) -> None:
    """Load ``directory/model.safetensors`` into ``model``; every tensor must match, none may be missing."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("load_weights needs a materialised model; move a meta-device model with to_empty() first")
    path = Path(directory) / SAFE_WEIGHTS_NAME
    try:
        own = {key for key in model.state_dict() if not key.startswith(PREFIX)}
        model.load_state_dict(from_hf_state_dict(load_file(path), own), strict=True)
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise UserError(f"{path}: does not hold the weights of the model in its config.json: {one_line(exc)}") from None
