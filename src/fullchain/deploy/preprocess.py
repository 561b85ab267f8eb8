"""Raw request items -> the tensors the model was trained on, using the preprocessing recorded in model.json.

Text goes through the model's own text encoder (the one training used), images and feature rows
through the same per-channel (per-column) float32 normalisation as `fullchain.data.samples.normalised_pairs`,
so a served prediction equals what `ds evaluate` computes for the same input.

An encoded image (PNG or JPEG only: PIL's other readers are more attack surface for nothing) is decoded only
when its header gives the model's width and height: a small file declaring huge dimensions (a decompression
bomb) is refused before a pixel is inflated.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fullchain.artifact import LoadedModel
from fullchain.errors import UserError
from fullchain.tasks.classification import TOKENS

SERVABLE_KINDS = {"text": "texts", "image": "images", "features": "features"}
IMAGE_FORMATS = ("PNG", "JPEG")


class InputError(ValueError):
    """A request item that passed the schema but does not fit the model (shape, undecodable image)."""


class Preprocessor:
    """`encode` checks and converts one request's items (token ids, or raw float32 arrays); `collate` makes the
    items of many requests one batch of model inputs and normalises them in one pass, so the event loop runs no
    per-item tensor math."""

    def __init__(self, loaded: LoadedModel):
        meta, self.task = loaded.meta, loaded.task
        self.kind = meta.input.get("kind")
        if self.kind not in SERVABLE_KINDS or not self.task.servable:
            raise UserError(f"model input kind {self.kind!r} cannot be served; ds serve serves classifiers of "
                            f"{', '.join(SERVABLE_KINDS)}")
        if self.kind == "text" and loaded.encoder is None:
            raise UserError("text model without tokenizer.json beside model.json; copy it from the model directory")
        self.field = SERVABLE_KINDS[self.kind]
        self.encoder = loaded.encoder
        pre = meta.preprocessing
        self.channels = meta.input.get("channels")
        self.height, self.width = meta.input.get("height"), meta.input.get("width")
        self.num_features = meta.input.get("num_features")
        self.color_mode = pre.get("color_mode") or ("L" if self.channels == 1 else "RGB")
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32) if "mean" in pre else None
        self.std = torch.tensor(pre["std"], dtype=torch.float32) if "std" in pre else None

    def encode(self, items: Sequence[Any]) -> list[Any]:
        if self.kind == "text":
            pad = torch.tensor([self.encoder.pad_id])
            return [t if t.numel() else pad for t in self.encoder.encode(items)]  # an empty text is one pad token
        if self.kind == "image":
            return [self._image(item, i) for i, item in enumerate(items)]
        return [self._features(row, i) for i, row in enumerate(items)]

    @staticmethod
    def decodes(items: Sequence[Any]) -> bool:
        """Whether `encode` decodes these items (texts, encoded images): work worth a thread off the event loop.
        Nested arrays, already parsed by the request schema, are converted in microseconds."""
        return any(isinstance(item, str) for item in items)

    def collate(self, items: list[Any]) -> tuple[torch.Tensor, ...]:
        """The model's inputs for `items`, in the task's order."""
        if self.kind == "text":
            return self.task.model_inputs(self.task.collate([{TOKENS: ids} for ids in items]))
        x = torch.from_numpy(np.stack(items))
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel / per column, as in normalised_pairs
            x = x.sub_(self.mean.view(shape)).div_(self.std.view(shape))
        return (x,)

    def _image(self, item: Any, index: int) -> np.ndarray:
        c, h, w = self.channels, self.height, self.width
        if isinstance(item, str):
            pixels = decode_image(item, self.color_mode, (w, h), index)
        else:
            pixels = as_array(item, index)
        if pixels.ndim == 2 and c == 1:
            pixels = pixels[None]
        elif pixels.ndim == 3 and isinstance(item, str):
            pixels = pixels.transpose(2, 0, 1)  # PIL gives H, W, C
        if pixels.shape != (c, h, w):
            raise InputError(f"images[{index}]: shape {list(pixels.shape)} but the model takes {[c, h, w]}"
                             + (f" (or {[h, w]})" if c == 1 else ""))
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def _features(self, row: Any, index: int) -> np.ndarray:
        if len(row) != self.num_features:
            raise InputError(f"features[{index}]: {len(row)} values but the model takes {self.num_features}")
        return np.asarray(row, dtype=np.float32)

def as_array(item: Any, index: int) -> np.ndarray:
    try:
        return np.asarray(item, dtype=np.float32)
    except ValueError:  # ragged nesting
        raise InputError(f"images[{index}]: rows of different lengths; give a [C, H, W] or [H, W] array") from None


def decode_image(text: str, mode: str, size: tuple[int, int], index: int) -> np.ndarray:
    """A base64 PNG or JPEG of `size` (width, height) as raw pixel values in the training colour mode."""
    try:
        raw = base64.b64decode(text.split(",", 1)[-1], validate=True)  # tolerate a data: URL prefix
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:  # parses the header only
            if image.size == size:
                return np.asarray(image.convert(mode), dtype=np.float32)
            found = image.size
    except Image.DecompressionBombError as exc:  # PIL's own pixel limit, met while parsing the header
        raise InputError(f"images[{index}]: {exc}") from None
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError) as exc:
        raise InputError(f"images[{index}]: not a base64-encoded PNG or JPEG image ({exc})") from None
    raise InputError(f"images[{index}]: {found[0]}x{found[1]} pixels but the model takes {size[0]}x{size[1]} "
                     "(width x height)")
