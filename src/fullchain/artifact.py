"""The model artifact: a self-describing directory that any later stage rebuilds without pickle.

Layout::

    model/
      model.safetensors   weights (safetensors; shared tensors such as tied embeddings handled)
      model.json          builder (reference name or user target) and its full arguments, input signature,
                          label names, preprocessing, the data recipe it was trained on, library versions
      tokenizer.json      for text models (the `tokenizers` library's own format)

Shared by train (writes it) and optimize/deploy/evaluate (read it); none of them reaches into another.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

import fullchain
from fullchain.errors import UserError

FORMAT = "fullchain-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"
TOKENIZER = "tokenizer.json"


def library_versions() -> dict[str, str]:
    import safetensors
    import tokenizers

    return {
        "fullchain": fullchain.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ModelSpec:
    """Everything in model.json: how to rebuild the model and how to feed it."""

    builder: dict[str, str]  # {"name": "transformer"} or {"target": "pkg.mod:Class"}
    args: dict[str, Any]
    input: dict[str, Any]  # kind, dtype and the data's input_spec
    label_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # the data config + seed the model was trained on (for ds evaluate)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "builder": self.builder,
            "args": self.args,
            "input": self.input,
            "label_names": self.label_names,
            "preprocessing": self.preprocessing,
            "data": self.data,
            "extra": self.extra,
            "versions": library_versions(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelSpec:
        return cls(
            builder=raw["builder"],
            args=raw["args"],
            input=raw["input"],
            label_names=raw.get("label_names", []),
            preprocessing=raw.get("preprocessing", {}),
            data=raw.get("data"),
            extra=raw.get("extra", {}),
        )


TOKEN_KINDS = ("text", "lm")


def sample_inputs(spec: ModelSpec, batch: int = 3, length: int | None = None, seed: int = 0) -> torch.Tensor:
    """Inputs of the artifact's signature: token ids with trailing padding, or unit-normal images/features.

    Token rows get different amounts of padding, as a server's padded batches do; ``length`` defaults to
    24 tokens and is capped at the model's ``max_length``.
    """
    g = torch.Generator().manual_seed(seed)
    inp = spec.input
    if inp["kind"] in TOKEN_KINDS:
        t = min(length or 24, inp["max_length"])
        ids = torch.randint(1, inp["vocab_size"], (batch, t), generator=g)
        if inp["kind"] == "text":
            for row in range(1, batch):
                ids[row, t - row * max(1, t // (2 * batch)):] = 0
        return ids
    if inp["kind"] == "image":
        return torch.randn(batch, inp["channels"], inp["height"], inp["width"], generator=g)
    return torch.randn(batch, inp["num_features"], generator=g)


def save_artifact(directory: str | Path, model: torch.nn.Module, spec: ModelSpec, tokenizer: Any = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER))
    (directory / META).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return directory


def read_spec(directory: str | Path) -> ModelSpec:
    directory = Path(directory)
    meta = directory / META
    if not meta.is_file():
        raise UserError(f"{directory}: not a model artifact (no {META}); expected a directory written by ds train")
    try:
        raw = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{meta}: format {raw.get('format')!r} is not {FORMAT!r}")
    try:
        return ModelSpec.from_json(raw)
    except KeyError as exc:
        raise UserError(f"{meta}: missing field {exc.args[0]!r}") from None


def load_artifact(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the model from its builder and arguments, then load the weights (strictly).

    An optimised artifact (``extra.optimize`` in model.json) is rebuilt through `fullchain.optimize.recipe`.
    """
    from fullchain.models import build_model

    directory = Path(directory)
    spec = read_spec(directory)
    model = build_model(name=spec.builder.get("name"), target=spec.builder.get("target"), args=spec.args)
    recipe = spec.extra.get("optimize")
    if recipe:  # an optimised artifact: rebuild its rewritten structure before loading its weights
        from fullchain.optimize.recipe import rebuild

        model = rebuild(model, recipe, (sample_inputs(spec),))
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{directory}: missing {WEIGHTS}")
    missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not fit the model built from {META}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    model = model.to(device).eval()
    if recipe:
        from fullchain.optimize.recipe import for_inference

        model = for_inference(model, recipe)
    return model, spec


def load_tokenizer(directory: str | Path) -> Any | None:
    path = Path(directory) / TOKENIZER
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
