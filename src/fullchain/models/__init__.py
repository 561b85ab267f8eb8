"""Reference models and the builder registry.

- `MLP` (features), `ResNetCNN` (images, up to ResNet-50/152 via `RESNET_PRESETS`),
  `TransformerClassifier` (text), `CausalLM` (language modelling); the two Transformers share
  `fullchain.models.encoder`, whose attention is written out explicitly for the fusion passes.
- `build_model(name=... | target="pkg.module:Class", args=...)`, `model_args_from_data`, `MODELS`,
  `count_parameters`.
"""

from fullchain.models.causal_lm import CausalLM
from fullchain.models.cnn import RESNET_PRESETS, ResNetCNN
from fullchain.models.encoder import PAD_ID, SelfAttention, TransformerBlock, TransformerEncoder
from fullchain.models.mlp import MLP
from fullchain.models.registry import MODELS, build_model, count_parameters, model_args_from_data
from fullchain.models.transformer import TransformerClassifier

__all__ = [
    "MLP",
    "MODELS",
    "PAD_ID",
    "RESNET_PRESETS",
    "CausalLM",
    "ResNetCNN",
    "SelfAttention",
    "TransformerBlock",
    "TransformerClassifier",
    "TransformerEncoder",
    "build_model",
    "count_parameters",
    "model_args_from_data",
]
