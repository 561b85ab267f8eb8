"""Build models by name (the reference models) or by ``target="pkg.module:Class"`` (user models).

A model artifact stores a builder (``name`` or ``target``) and the complete keyword arguments; that
is enough to rebuild the module without pickle. `model_args_from_data` produces those arguments:
defaults from the constructor's signature, data-derived sizes (classes, vocabulary, sequence length,
channels, features) from the dataset's ``input_spec``, and the user's own values on top.

Every mistake a user can make here (unknown name, bad target, wrong arguments) raises `UserError`
with a one-line message that names the model or target.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fullchain.errors import UserError
from fullchain.models.causal_lm import CausalLM
from fullchain.models.cnn import ResNetCNN
from fullchain.models.mlp import MLP
from fullchain.models.transformer import TransformerClassifier

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": ResNetCNN,
    "transformer": TransformerClassifier,
    "causal_lm": CausalLM,
}

# Constructor parameters whose value comes from the data, and how the reference models relate to it:
# "min" = the user may set a larger value (a bigger vocabulary or position table, more classes),
# "eq" = it must match the data exactly.
DATA_ARGS: dict[str, str] = {
    "num_classes": "min",
    "vocab_size": "min",
    "max_length": "min",
    "channels": "eq",
    "num_features": "eq",
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _label(name: str | None, target: str | None) -> str:
    return f"model {name!r}" if name is not None else f"model target {target!r}"


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


def _import_target(target: str) -> Callable[..., Any]:
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise UserError(f"model target {target!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also any error raised while the user's module runs
        raise UserError(
            f"model target {target!r}: cannot import module {module_name!r} ({_one_line(exc)}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"model target {target!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise UserError(
                f"model target {target!r}: {obj.__qualname__} is a class but not a torch.nn.Module"
            )
    elif not callable(obj):
        raise UserError(
            f"model target {target!r} is a {type(obj).__name__}, not an nn.Module subclass "
            "or a function returning one"
        )
    return obj


def _resolve(name: str | None, target: str | None) -> Callable[..., Any]:
    if (name is None) == (target is None):
        raise UserError("give a model either a name (one of: " + ", ".join(sorted(MODELS)) + ") or a target "
                        "'package.module:ClassName', not both and not neither")
    if name is not None:
        if name not in MODELS:
            raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
        return MODELS[name]
    return _import_target(target)


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
    return spec.get(key)


def model_args_from_data(
    name: str | None,
    input_spec: Mapping[str, Any],
    args: Mapping[str, Any] | None = None,
    *,
    target: str | None = None,
) -> dict[str, Any]:
    """The complete constructor arguments for a model, as stored in the model artifact.

    Starts from the constructor's defaults, fills each data-derived parameter the constructor accepts
    (num_classes, vocab_size, max_length, channels, num_features; for images num_features is
    channels*height*width) from ``input_spec`` unless the user set it in ``args``, then applies
    ``args``. For reference models a user value must fit the data: at least the data's num_classes,
    vocab_size and max_length; exactly its channels and num_features. Tuples become lists (JSON).
    """
    args = dict(args or {})
    label = _label(name, target)
    factory = _resolve(name, target)
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
            if name is None or data_value is None:
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
    name: str | None = None, target: str | None = None, args: Mapping[str, Any] | None = None
) -> nn.Module:
    """Construct a reference model by ``name`` or a user model by ``target="pkg.module:Class"``.

    ``target`` may name an ``nn.Module`` subclass or a function that returns an ``nn.Module``; it is
    imported with importlib, so its package must be importable (installed or on PYTHONPATH).
    Raises `UserError` naming the model/target for: unknown name, unimportable module, missing
    attribute, an object that is not a module class or factory, arguments that do not fit the
    constructor (the message lists the accepted parameters), or an error raised while constructing.
    """
    args = dict(args or {})
    label = _label(name, target)
    factory = _resolve(name, target)
    sig = _signature(factory)
    _check_args(label, sig, args)
    try:
        model = factory(**args)
    except TypeError as exc:
        accepted = f"; accepted parameters: {_accepted(sig)}" if sig is not None else ""
        raise UserError(f"{label}: bad arguments ({_one_line(exc)}){accepted}") from exc
    except ValueError as exc:
        raise UserError(f"{label}: {_one_line(exc)}") from exc
    except Exception as exc:
        if name is not None:
            raise  # a reference model failing on arguments that bound: a fullchain bug, keep the traceback
        raise UserError(f"{label}: constructing the model failed ({_one_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"{label} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once); only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
