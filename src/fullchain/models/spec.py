"""A model spec: everything the framework needs to know about one architecture, beside its constructor.

In the spirit of torchtitan's model spec: the registry maps a name to a `ModelSpec`, and that is the one list
of allowed model names (config validation and the CLI's help read it). A spec says which input kinds the
model serves (so a CNN asked to read text fails before training, in one line), which of the task's inputs it
takes (a Hugging Face encoder also takes ``attention_mask``), and carries optional hooks that later work plugs
in: ``parallelize(model, mesh, cfg)`` (tensor / data parallel plans) and a state-dict adapter (checkpoint
names <-> this implementation's names). Builders are plain constructors, so ``with torch.device("meta")`` builds
a model without allocating its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    input_kinds: tuple[str, ...]  # data kinds it reads: text, image, features, lm
    summary: str
    input_names: tuple[str, ...] | None = None  # None: the task's primary input only
    parallelize: Callable[[nn.Module, Any, Any], nn.Module] | None = None
    state_dict_adapter: Any | None = None

    def check_kind(self, kind: str, source: str = "") -> None:
        """A one-line error when this model cannot read data of `kind`."""
        if kind not in self.input_kinds:
            from fullchain.errors import UserError

            where = f"{source}: " if source else ""
            raise UserError(f"{where}model {self.name!r} reads {' or '.join(self.input_kinds)} data, "
                            f"but the data is {kind}; choose a model for {kind} data")
