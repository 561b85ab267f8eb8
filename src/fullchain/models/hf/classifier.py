"""A transformers sequence classifier behind fullchain's calling convention: tensors in, logits out.

Every fullchain model is called positionally with its task's inputs and returns a tensor, which is what
the Trainer, the exporters and the server rely on. `HFClassifier` gives a transformers
``*ForSequenceClassification`` model that shape: ``forward(input_ids, attention_mask) -> logits [B, labels]``.

Two ways in: `pretrained_classifier` puts a freshly initialised head (drawn from the caller's torch seed) on a
checkpoint's pretrained body, and `build_from_config` rebuilds the architecture from a config.json alone
(on any device, ``meta`` included) for weights loaded afterwards (`fullchain.models.hf.artifact`).
Both build in float32 (transformers 5 otherwise takes the checkpoint's dtype) with the KV cache off
(a classifier never decodes, and a cache object in the outputs would get in the way of export).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME

from fullchain.errors import UserError, one_line
from fullchain.models.hf.architecture import classifier_config, read_config_values
from fullchain.models.hf.pooling import PooledClassifier, declared_pooling
from fullchain.models.hf.quiet import quiet_transformers

HEAD = "head"  # the architecture's own sequence-classification head (transformers' *ForSequenceClassification)


class HFClassifier(nn.Module):
    """``forward(input_ids, attention_mask)`` returns the logits tensor ``[batch, num_labels]``.

    The transformers model is the ``hf`` submodule, so this module's state-dict keys are transformers' own
    keys with an ``hf.`` prefix (`fullchain.models.hf.artifact` translates).
    """

    def __init__(self, hf: PreTrainedModel):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def pretrained_classifier(
    directory: Path, label_names: Sequence[str], pad_id: int, console: Console | None = None,
    pooling: str | None = None, max_length: int | None = None,
) -> HFClassifier | PooledClassifier:
    """The checkpoint in ``directory`` with a new head for ``label_names``, padding with ``pad_id``.

    ``pad_id`` must be the id the tokenizer pads with (`TextEncoder.pad_id`): GPT-2-style classifiers read
    the logits at the last token that is not ``pad_token_id``. The weights come from safetensors only.
    One line on ``console`` names the tensors that were initialised rather than loaded. ``max_length``, when
    given, is checked against the position table first (`check_max_length`), before any weight is read.
    """
    directory = Path(directory)
    pooling = pooling or declared_pooling(directory) or HEAD
    config = classifier_config(read_config_values(directory), str(directory / CONFIG_NAME), head=pooling == HEAD)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: index for index, name in enumerate(label_names)}
    config.pad_token_id = pad_id
    _without_cache(config)
    auto = AutoModelForSequenceClassification if pooling == HEAD else AutoModel
    if max_length is not None:  # on a weightless build, so a refusal is all that is said
        with torch.device("meta"):
            check_max_length(HFClassifier(auto.from_config(config)), max_length)
    try:
        with quiet_transformers():
            hf, info = auto.from_pretrained(
                directory,
                config=config,
                dtype=torch.float32,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                ignore_mismatched_sizes=True,  # a source that is itself a classifier may have another label count
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{directory}: could not load the pretrained weights: {one_line(exc)}") from None
    model = HFClassifier(hf) if pooling == HEAD else PooledClassifier(hf, len(label_names), pooling)
    mismatched = {key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ())}
    fresh = sorted(set(info.get("missing_keys", ())) | mismatched)
    model.fresh_parameters = [f"hf.{key}" for key in fresh] + ([] if pooling == HEAD else ["classifier.weight",
                                                                                            "classifier.bias"])
    _report_load(console or Console(stderr=True), directory, hf, fresh, info, pooling)
    return model.train()  # from_pretrained hands back eval mode; build_from_config does not


def build_from_config(
    config: Path | Mapping[str, Any], device: str | torch.device = "cpu", pooling: str = "head"
) -> HFClassifier | PooledClassifier:
    """The classifier described by a model directory's config.json (or its parsed contents), without weights:
    the architecture's own head (``pooling="head"``), or a `PooledClassifier` over its base model.

    The weights are freshly initialised from the torch seed, or left unallocated with ``device="meta"``
    (for sizing and sharding before `fullchain.models.hf.artifact.load_weights` or a sharded load).
    """
    if isinstance(config, Mapping):
        values, where = config, "config"
    else:
        values, where = read_config_values(Path(config)), str(Path(config) / CONFIG_NAME)
    hf_config = classifier_config(values, where, head=pooling == HEAD)
    _without_cache(hf_config)
    auto = AutoModelForSequenceClassification if pooling == HEAD else AutoModel
    with torch.device(device):
        hf = auto.from_config(hf_config, dtype=torch.float32, trust_remote_code=False)
        return HFClassifier(hf) if pooling == HEAD else PooledClassifier(hf, hf_config.num_labels, pooling)


def max_positions(model: HFClassifier) -> int | None:
    """The longest input ``model`` has positions for, or None when its config sets no limit."""
    limit = getattr(model.hf.config, "max_position_embeddings", None)
    if limit is None:
        return None
    return limit - _position_offset(model)


def check_max_length(model: HFClassifier, max_length: int) -> None:
    """Refuse a ``max_length`` longer than the model's position table."""
    limit = max_positions(model)
    if limit is None or max_length <= limit:
        return
    offset = _position_offset(model)
    table = model.hf.config.max_position_embeddings
    reserved = f" ({table} position embeddings, {offset} reserved)" if offset else ""
    raise UserError(f"max_length {max_length} is longer than the {limit} positions "
                    f"{type(model.hf).__name__} supports{reserved}; set max_length to {limit} or less")


def _position_offset(model: HFClassifier) -> int:
    # RoBERTa-style embeddings number positions from padding_idx + 1, so the first rows of the table are unused.
    embeddings = getattr(model.hf.base_model, "embeddings", None)
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        return embeddings.padding_idx + 1
    return 0


def _without_cache(config: PreTrainedConfig) -> None:
    if hasattr(config, "use_cache"):
        config.use_cache = False


def _report_load(console: Console, directory: Path, hf: PreTrainedModel, fresh: list[str], info: dict[str, Any],
                 pooling: str) -> None:
    unused = info.get("unexpected_keys", ())
    head = "its own classification head" if pooling == HEAD else f"{pooling} pooling and a new linear head"
    line = (f"{directory}: pretrained {type(hf).__name__} with {head}; newly initialised in the checkpoint's "
            f"model: {', '.join(fresh) or 'nothing'}")
    if unused:
        line += f"; {len(unused)} checkpoint tensors unused"
    console.print(line, highlight=False, soft_wrap=True)
