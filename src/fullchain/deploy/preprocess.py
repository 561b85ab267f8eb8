"""Raw request items -> the tensors the model was trained on, using the preprocessing recorded in model.json.

Text goes through the data package's own `encode_texts` with the saved tokenizer, images and feature rows
through the same per-channel (per-column) float32 normalisation as `fullchain.data.samples.normalised_pairs`,
so a served prediction equals what `ds evaluate` computes for the same input.
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

from fullchain.artifact import ModelSpec
from fullchain.data.bundle import PAD_ID
from fullchain.data.tokenizer import encode_texts
from fullchain.errors import UserError

SERVABLE_KINDS = {"text": "texts", "image": "images", "features": "features"}


class InputError(ValueError):
    """A request item that passed the schema but does not fit the model (shape, undecodable image)."""


class Preprocessor:
    """`encode` checks and converts one request's items (token ids, or raw float32 arrays); `collate` stacks the
    items of many requests and normalises them in one pass, so the event loop runs no per-item tensor math."""

    def __init__(self, spec: ModelSpec, tokenizer: Any | None):
        self.kind = spec.input.get("kind")
        if self.kind not in SERVABLE_KINDS:
            raise UserError(f"model input kind {self.kind!r} cannot be served; ds serve serves classifiers of "
                            f"{', '.join(SERVABLE_KINDS)}")
        if self.kind == "text" and tokenizer is None:
            raise UserError("text model without tokenizer.json beside model.json; copy it from the model directory")
        self.field = SERVABLE_KINDS[self.kind]
        self.tokenizer = tokenizer
        pre = spec.preprocessing
        self.max_length = pre.get("max_length") or spec.input.get("max_length")
        self.channels = spec.input.get("channels")
        self.height, self.width = spec.input.get("height"), spec.input.get("width")
        self.num_features = spec.input.get("num_features")
        self.color_mode = pre.get("color_mode") or ("L" if self.channels == 1 else "RGB")
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32) if "mean" in pre else None
        self.std = torch.tensor(pre["std"], dtype=torch.float32) if "std" in pre else None

    def encode(self, items: Sequence[Any]) -> list[Any]:
        if self.kind == "text":
            ids = encode_texts(self.tokenizer, items, self.max_length)
            return [t if t.numel() else torch.tensor([PAD_ID]) for t in ids]  # an empty text is one pad token
        if self.kind == "image":
            return [self._image(item, i) for i, item in enumerate(items)]
        return [self._features(row, i) for i, row in enumerate(items)]

    def collate(self, items: list[Any]) -> torch.Tensor:
        if self.kind == "text":
            return torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=PAD_ID)
        x = torch.from_numpy(np.stack(items))
        if self.mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel / per column, as in normalised_pairs
        return x.sub_(self.mean.view(shape)).div_(self.std.view(shape))

    def _image(self, item: Any, index: int) -> np.ndarray:
        c, h, w = self.channels, self.height, self.width
        pixels = decode_png(item, self.color_mode, index) if isinstance(item, str) else as_array(item, index)
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


def decode_png(text: str, mode: str, index: int) -> np.ndarray:
    """A base64 PNG (or any image PIL reads) as raw pixel values in the training colour mode."""
    try:
        raw = base64.b64decode(text.split(",", 1)[-1], validate=True)  # tolerate a data: URL prefix
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert(mode), dtype=np.float32)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"images[{index}]: not a base64-encoded image ({exc})") from None
