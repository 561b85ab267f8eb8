"""Pretrained Hugging Face models as fullchain classifiers (``model: {hf: SOURCE}`` in a run file).

- `resolve_source`: a checkpoint directory, or an installed package that ships one, found without importing it.
- `load_text_encoder` / `TextEncoder`: the model's own tokenizer, encoding unpadded ids up to ``max_length``.
- `pretrained_classifier`: pretrained body + fresh head; `HFClassifier`: ``(input_ids, attention_mask) -> logits``
  with the architecture's own head, `PooledClassifier` with the pooling a sentence-embedding checkpoint declares.
- `check_max_length` / `max_positions`: ``max_length`` against the model's position table.
- `save_weights`, `build_from_config`, `load_weights`, `to_hf_state_dict`, `from_hf_state_dict`: the artifact side,
  a directory that is also an ordinary Hugging Face checkpoint, read back without pickle or checkpoint code.

Importing this package imports transformers (seconds), so import it only where a Hugging Face model is used.
"""

from fullchain.models.hf.quiet import quiet_imports

with quiet_imports():
    from fullchain.models.hf.artifact import from_hf_state_dict, load_weights, save_weights, to_hf_state_dict
    from fullchain.models.hf.classifier import (
        HFClassifier,
        build_from_config,
        check_max_length,
        max_positions,
        pretrained_classifier,
    )
    from fullchain.models.hf.pooling import POOLINGS, PooledClassifier, declared_pooling
    from fullchain.models.hf.source import resolve_source
    from fullchain.models.hf.text import TextEncoder, load_text_encoder

__all__ = [
    "POOLINGS",
    "HFClassifier",
    "PooledClassifier",
    "declared_pooling",
    "TextEncoder",
    "build_from_config",
    "check_max_length",
    "from_hf_state_dict",
    "load_text_encoder",
    "load_weights",
    "max_positions",
    "pretrained_classifier",
    "resolve_source",
    "save_weights",
    "to_hf_state_dict",
]
