"""Writing a model directory and rebuilding its torch module, without pickle and without running its author's code.

The builder in model.json decides how the module is rebuilt: a registered model (fullchain's own code), a
Hugging Face architecture (built from its config.json by transformers, weights under transformers' own names,
so the directory is also an ordinary Hugging Face checkpoint), or user code named by ``target`` (imported only
with ``trust_code``: see `fullchain.models.targets`). An optimised artifact replays its recorded graph passes
(`fullchain.optimize.recipe`) on the rebuilt module before its weights load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from fullchain.artifact.meta import META, TOKENIZER, TOKENIZER_FILES, WEIGHTS, ArtifactMeta, read_meta
from fullchain.data.tokenizer import TextEncoder, TextEncoding
from fullchain.errors import UserError


def save_artifact(
    directory: str | Path, model: torch.nn.Module, meta: ArtifactMeta, encoder: TextEncoder | None = None
) -> Path:
    """Write `model`'s weights (safetensors), its tokenizer files and model.json (last) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "hf" in meta.builder:
        from fullchain.models.hf import save_weights

        save_weights(directory, model)
    else:
        save_model(model, str(directory / WEIGHTS))
    if encoder is not None:
        encoder.save(directory)
    (directory / META).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return directory


def save_variant(
    out_dir: Path, source_dir: Path, model: torch.nn.Module, meta: ArtifactMeta, **extra: dict[str, Any]
) -> Path:
    """An artifact derived from the one in `source_dir` (optimised, int8): `model`'s weights, the source's
    tokenizer files, and its model.json with `extra` sections (``optimize=...``, ``quantize=...``) added."""
    derived = ArtifactMeta.from_json(meta.to_json())
    derived.extra = {**meta.extra, **extra}
    out_dir = save_artifact(out_dir, model, derived)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, out_dir / name)
    return out_dir


def _build(directory: Path, meta: ArtifactMeta, trust_code: bool) -> torch.nn.Module:
    if "hf" in meta.builder:
        from fullchain.models.hf import build_from_config

        return build_from_config(directory, pooling=meta.args.get("pooling", "head"))
    from fullchain.models import build_model
    from fullchain.models.targets import TargetOrigin

    origin = TargetOrigin(str(directory / META), from_artifact=True, trust_code=trust_code)
    return build_model(name=meta.builder.get("name"), target=meta.builder.get("target"), args=meta.args,
                       origin=origin)


def _load_weights(model: torch.nn.Module, directory: Path, meta: ArtifactMeta) -> None:
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{directory}: missing {WEIGHTS}")
    if "hf" in meta.builder:
        from fullchain.models.hf import load_weights

        load_weights(model, directory)
        return
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not fit the model built from {META}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def load_artifact(
    directory: str | Path, device: str | torch.device = "cpu", *, trust_code: bool = False, compiled: bool = True
) -> tuple[torch.nn.Module, ArtifactMeta]:
    """Rebuild the model from its builder (see the module docstring), load its weights strictly, eval mode.

    ``compiled=False`` leaves out the ``torch.compile`` an optimised artifact's recipe asks for (export takes the
    plain graph: compiling is a runtime choice).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    model = _build(directory, meta, trust_code)
    recipe = meta.extra.get("optimize")
    if recipe:  # an optimised artifact: rebuild its rewritten structure before loading its weights
        from fullchain.optimize.recipe import rebuild

        model = rebuild(model, recipe, meta.make_task().example_inputs())
    _load_weights(model, directory, meta)
    model = model.to(device).eval()
    if recipe:
        from fullchain.optimize.recipe import for_inference

        model = for_inference(model, {**recipe, "compile": recipe.get("compile") and compiled})
    return model, meta


def load_tokenizer(directory: str | Path) -> Any | None:
    path = Path(directory) / TOKENIZER
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def text_encoding(directory: str | Path, meta: ArtifactMeta) -> TextEncoder | None:
    """How this artifact's model turns text into token ids (None for models that do not read text)."""
    if meta.input.get("kind") not in ("text", "lm"):
        return None
    pre = {"max_length": meta.input.get("max_length"), "pad_id": meta.input.get("pad_id", 0), **meta.preprocessing}
    if "hf" in meta.builder:  # a pretrained model's own tokenizer, saved beside its weights
        from fullchain.models.hf import load_text_encoder

        return load_text_encoder(Path(directory), int(pre["max_length"]))
    tokenizer = load_tokenizer(directory)
    return None if tokenizer is None else TextEncoding.from_preprocessing(pre, tokenizer)
