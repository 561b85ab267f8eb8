"""Which Hugging Face configs fullchain builds: sequence classifiers built into transformers, nothing else.

A config.json can point at custom model code (``auto_map``) that transformers would import or download
under ``trust_remote_code``. fullchain never runs code from a checkpoint, so such a config is refused, and
so is a ``model_type`` without a sequence-classification class in the installed transformers
(``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`` lists exactly the built-in ones).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import transformers
from transformers import CONFIG_MAPPING, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.utils import CONFIG_NAME

from fullchain.errors import UserError, one_line


def read_config_values(directory: Path) -> dict[str, Any]:
    """The raw contents of ``directory/config.json``."""
    path = Path(directory) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (a Hugging Face model directory needs its config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file: {one_line(exc)}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


def classifier_config(values: Mapping[str, Any], where: str, head: bool = True) -> PreTrainedConfig:
    """The typed config for ``values`` (a config.json's contents, described as ``where`` in messages): of a
    built-in sequence classifier (``head``), or of a built-in base model (for a pooled classifier)."""
    if "auto_map" in values:
        raise UserError(f"{where}: 'auto_map' names custom model code; fullchain builds only architectures built "
                        "into transformers and never runs code from a checkpoint")
    model_type = values.get("model_type")
    known = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if head else MODEL_MAPPING_NAMES
    if model_type not in known:
        what = "sequence classifier" if head else "base model"
        raise UserError(f"{where}: model_type {model_type!r} has no {what} built into transformers "
                        f"{transformers.__version__}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(values))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: invalid {model_type} config: {one_line(exc)}") from None
