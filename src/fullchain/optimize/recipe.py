"""How an optimised artifact is rebuilt: the recipe recorded in ``model.json`` under ``extra.optimize``.

An optimised model's structure (fused Linears, SDPA calls, folded convs) is not pickled: `rebuild`
replays the recorded passes on the freshly built original model, which yields the same modules and
parameter names, converts to the recorded dtype, and the artifact's safetensors weights load on top.
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
        args = tree_map(lambda t: t.to(self.dtype) if torch.is_tensor(t) and t.is_floating_point() else t, args)
        out = self.module(*args)
        return tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out)


def recipe_of(extra: dict[str, Any]) -> dict[str, Any] | None:
    return extra.get("optimize")


def rebuild(model: nn.Module, recipe: dict[str, Any], example_inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The optimised structure, in the recorded dtype, before its weights are loaded."""
    from fullchain.optimize.manager import replay

    passes = recipe.get("passes") or []
    structure = replay(model.eval(), passes, example_inputs) if passes else model.eval()
    return structure.to(DTYPES[recipe.get("precision", "fp32")])


def for_inference(model: nn.Module, recipe: dict[str, Any]) -> nn.Module:
    """Wrap the loaded model for the recorded precision and compile it if the recipe says so."""
    dtype = DTYPES[recipe.get("precision", "fp32")]
    if dtype != torch.float32:
        model = InferencePrecision(model, dtype)
    if recipe.get("compile"):
        model = torch.compile(model, mode=recipe.get("compile_mode") or None)
    return model.eval()
