"""The model artifact: a self-describing directory, and the only code that reads or writes one.

Layout::

    model/
      model.json          builder (a registered name, user code by target, or a Hugging Face architecture) and
                          its full arguments, input signature, task, label names, preprocessing, the data recipe
                          it was trained on, library versions; `extra.optimize` / `extra.quantize` for variants
      model.safetensors   weights (under transformers' own names for a Hugging Face model, with its config.json)
      tokenizer.json      for text models (the `tokenizers` library's own format)
      model.onnx          written by ds export, or the int8 model of an ONNX Runtime quantisation
      model.pt2           the int8 program of an Inductor quantisation (checked before it is opened)

`meta` reads model.json, `store` writes a directory and rebuilds its torch module, `serving` turns any variant
into a callable with its task, `program` checks ``model.pt2`` archives.
"""

from fullchain.artifact.meta import (
    FORMAT,
    META,
    ONNX_FILE,
    TOKENIZER,
    TOKENIZER_FILES,
    WEIGHTS,
    ArtifactMeta,
    read_meta,
)
from fullchain.artifact.serving import RUNTIMES, LoadedModel, load, quantization_of, resolve_runtime
from fullchain.artifact.store import load_artifact, load_tokenizer, save_artifact, save_variant, text_encoding

__all__ = [
    "FORMAT", "META", "ONNX_FILE", "RUNTIMES", "TOKENIZER", "TOKENIZER_FILES", "WEIGHTS", "ArtifactMeta",
    "LoadedModel", "load", "load_artifact", "load_tokenizer", "quantization_of", "read_meta", "resolve_runtime",
    "save_artifact", "save_variant", "text_encoding",
]
