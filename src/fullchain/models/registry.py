"""Build models by name (the reference models) or by ``target="pkg.module:Class"`` (user models).

A model artifact stores a builder (``name`` or ``target``) and the complete keyword arguments; that
is enough to rebuild the module without pickle. `model_args_from_data` produces those arguments:
defaults from the constructor's signature, data-derived sizes (classes, vocabulary, sequence length,
channels, features) from the dataset's ``input_spec``, and the user's own values on top.

Every mistake a user can make here (unknown name, bad target, wrong arguments) raises `UserError`
with a one-line message that names the model or target.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fullchain.errors import UserError, one_line
from fullchain.models.causal_lm import CausalLM
from fullchain.models.cnn import ResNetCNN
from fullchain.models.encoder import parallelize_encoder_model
from fullchain.models.mlp import MLP
from fullchain.models.spec import ModelSpec
from fullchain.models.targets import RUN_FILE, TargetOrigin, resolve_target
from fullchain.models.transformer import TransformerClassifier

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("mlp", MLP, ("features", "image"), "multi-layer perceptron for feature rows (images are flattened)"),
    ModelSpec("cnn", ResNetCNN, ("image",), "ResNet-style CNN, up to ResNet-50/152 presets"),
    ModelSpec("transformer", TransformerClassifier, ("text",), "Transformer encoder text classifier",
              parallelize=parallelize_encoder_model),
    ModelSpec("causal_lm", CausalLM, ("lm",), "small decoder-only language model",
              parallelize=parallelize_encoder_model),
)}

# Constructor parameters whose value comes from the data, and how the reference models relate to it:
# "min" = the user may set a larger value (a bigger vocabulary or position table, more classes),
# "eq" = it must match the data exactly.
DATA_ARGS: dict[str, str] = {
    "num_classes": "min",
    "num_labels": "min",
    "vocab_size": "min",
    "max_length": "min",
    "channels": "eq",
    "in_channels": "eq",
    "height": "eq",
    "width": "eq",
    "image_size": "eq",
    "num_features": "eq",
}
# Other spellings of the same data sizes that user models use.
ALIASES = {"num_labels": "num_classes", "in_channels": "channels"}


def _label(name: str | None, target: str | None, origin: TargetOrigin = RUN_FILE) -> str:
    return f"model {name!r}" if name is not None else origin.label(target)


def _signature(factory: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None


def _accepted(sig: inspect.Signature) -> str:
    parts = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return ", ".join(parts) or "(none)"


def _resolve(name: str | None, target: str | None, origin: TargetOrigin = RUN_FILE) -> Callable[..., Any]:
    if (name is None) == (target is None):
        raise UserError("give a model either a name (one of: " + ", ".join(sorted(MODELS)) + ") or a target "
                        "'package.module:ClassName', not both and not neither")
    if name is not None:
        if name not in MODELS:
            raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
        return MODELS[name].build
    return resolve_target(target, origin)


def _check_args(
    label: str, sig: inspect.Signature | None, args: Mapping[str, Any], partial: bool = False
) -> None:
    """Raise UserError when ``args`` cannot be bound to the constructor's signature."""
    if sig is None:
        return
    try:
        (sig.bind_partial if partial else sig.bind)(**args)
    except TypeError as exc:
        raise UserError(f"{label}: bad arguments ({exc}); accepted parameters: {_accepted(sig)}") from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _from_spec(key: str, spec: Mapping[str, Any]) -> Any:
    if key == "num_features" and "num_features" not in spec:
        if all(k in spec for k in ("channels", "height", "width")):
            return int(spec["channels"]) * int(spec["height"]) * int(spec["width"])
        return None
    if key == "image_size":
        return spec.get("height") if spec.get("height") == spec.get("width") else None
    return spec.get(ALIASES.get(key, key))


def model_args_from_data(
    name: str | None,
    input_spec: Mapping[str, Any],
    args: Mapping[str, Any] | None = None,
    *,
    target: str | None = None,
    origin: TargetOrigin = RUN_FILE,
) -> dict[str, Any]:
    """The complete constructor arguments for a model, as stored in the model artifact.

    Starts from the constructor's defaults, fills each data-derived parameter the constructor accepts
    (num_classes or num_labels, vocab_size, max_length, channels or in_channels, height, width, image_size
    for square images, num_features; for images num_features is channels*height*width) from ``input_spec``
    unless the user set it in ``args``, then applies ``args``. A user value must fit the data, for reference
    and user models alike: at least the data's classes, vocabulary and length (a smaller vocabulary would
    index out of range mid-training); exactly its channels, image size and features. Tuples become lists.
    """
    args = dict(args or {})
    label = _label(name, target, origin)
    factory = _resolve(name, target, origin)
    sig = _signature(factory)
    _check_args(label, sig, args, partial=True)  # unknown names now; missing ones once the data filled in
    result: dict[str, Any] = {}
    if sig is not None:
        params = {p.name: p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for pname, p in params.items():
            if p.default is not p.empty:
                result[pname] = p.default
        for key, rule in DATA_ARGS.items():
            if key not in params:
                continue
            data_value = _from_spec(key, input_spec)
            if key not in args:
                if data_value is not None:
                    result[key] = data_value
                continue
            if data_value is None:
                continue
            user_value = args[key]
            if not isinstance(user_value, int) or isinstance(user_value, bool):
                raise UserError(f"{label}: {key} must be an integer, got {user_value!r}")
            if rule == "min" and user_value < data_value:
                raise UserError(
                    f"{label}: {key}={user_value} is smaller than the data's {key} ({data_value}); "
                    f"remove it from the model arguments or set at least {data_value}"
                )
            if rule == "eq" and user_value != data_value:
                raise UserError(f"{label}: {key}={user_value} does not match the data ({key}={data_value}); "
                                "remove it from the model arguments")
    result.update(args)
    if sig is not None:
        missing = [p.name for p in sig.parameters.values()
                   if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                   and p.name not in result]
        if missing:
            raise UserError(f"{label} needs {', '.join(missing)}, which the data does not provide; "
                            "set it in the model arguments")
    _check_args(label, sig, result)
    return _jsonable(result)


def build_model(
    name: str | None = None,
    target: str | None = None,
    args: Mapping[str, Any] | None = None,
    *,
    origin: TargetOrigin = RUN_FILE,
) -> nn.Module:
    """Construct a reference model by ``name`` or a user model by ``target="pkg.module:Class"``.

    ``target`` may name an ``nn.Module`` subclass or a function that returns an ``nn.Module``; it is
    imported with importlib, so its package must be importable (installed or on PYTHONPATH). `origin` says
    who named it (a run file, or a model directory that needs ``--trust-code``): see `fullchain.models.targets`.
    Raises `UserError` naming the model/target for: unknown name, unimportable module, missing
    attribute, an object that is not a module class or factory, arguments that do not fit the
    constructor (the message lists the accepted parameters), or an error raised while constructing.
    """
    args = dict(args or {})
    label = _label(name, target, origin)
    factory = _resolve(name, target, origin)
    sig = _signature(factory)
    _check_args(label, sig, args)
    try:
        model = factory(**args)
    except TypeError as exc:
        accepted = f"; accepted parameters: {_accepted(sig)}" if sig is not None else ""
        raise UserError(f"{label}: bad arguments ({one_line(exc)}){accepted}") from exc
    except ValueError as exc:
        raise UserError(f"{label}: {one_line(exc)}") from exc
    except Exception as exc:
        if name is not None:
            raise  # a reference model failing on arguments that bound: a fullchain bug, keep the traceback
        raise UserError(f"{label}: constructing the model failed ({one_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"{label} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once); only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
