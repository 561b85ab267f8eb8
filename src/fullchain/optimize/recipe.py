"""How an optimised artifact is rebuilt: the recipe recorded in ``model.json`` under ``extra.optimize``.

An optimised model's structure (fused Linears, SDPA calls, folded convs) is not pickled: `rebuild`
converts the freshly built original model to the recorded dtype and replays capture and the recorded
passes on it, which yields the same modules and parameter names; the artifact's safetensors weights load
on top.
`for_inference` then adds what does not live in the weights: casting inputs to the inference dtype
(and outputs back to fp32, so callers see the same types as before) and ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InferencePrecision(nn.Module):
    """Runs ``module`` in ``dtype``: floating inputs are cast to it, floating outputs back to fp32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        args = cast_inputs(args, self.dtype)
        out = self.module(*args)
        return tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out)


def recipe_of(extra: dict[str, Any]) -> dict[str, Any] | None:
    return extra.get("optimize")


def cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``inputs`` converted to ``dtype`` (token ids and masks of other types stay as they are)."""
    return tree_map(lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t, inputs)


def rebuild(model: nn.Module, recipe: dict[str, Any], example_inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The optimised structure, in the recorded dtype, before its weights are loaded.

    The model is converted first and captured in that dtype, as `ds optimize` captured it: an exported graph
    records dtypes (``.float()`` upcasts, mask constants), so converting a captured graph afterwards would not
    give the same program.
    """
    from fullchain.optimize.manager import replay

    dtype = DTYPES[recipe.get("precision", "fp32")]
    model = model.eval().to(dtype)
    passes = recipe.get("passes") or []
    return replay(model, passes, cast_inputs(tuple(example_inputs), dtype)) if passes else model


def for_inference(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Wrap the loaded model for the recorded precision and compile it if the recipe says so."""
    dtype = DTYPES[recipe.get("precision", "fp32")]
    if dtype != torch.float32:
        model = InferencePrecision(model, dtype)
    if recipe.get("compile"):
        model = torch.compile(model, mode=recipe.get("compile_mode") or None)
    return model.eval()
