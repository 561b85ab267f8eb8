"""Request and response models of `POST /v1/predict`, one request model per input kind.

Unknown fields, wrong types, non-finite numbers, numbers beyond float32 (they would become infinity in the
model's dtype) and oversized lists are rejected by pydantic (422) before anything reaches the model; shapes
are checked against model.json by the preprocessor (422 as well).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_ITEMS = 256  # items in one request
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_B64_CHARS = 4_000_000
FLOAT32_MAX = float(np.finfo(np.float32).max)

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Text = Annotated[str, StringConstraints(strict=True, max_length=MAX_TEXT_CHARS)]
Png = Annotated[str, StringConstraints(strict=True, max_length=MAX_IMAGE_B64_CHARS)]
Image = Png | list[list[Finite]] | list[list[list[Finite]]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextRequest(Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_ITEMS, description="raw texts, classified in order")


class ImageRequest(Strict):
    images: list[Image] = Field(
        min_length=1, max_length=MAX_ITEMS,
        description="raw pixel values as [C, H, W] (or [H, W] for one channel) nested arrays, or base64 PNG",
    )


class FeaturesRequest(Strict):
    features: list[list[Finite]] = Field(min_length=1, max_length=MAX_ITEMS, description="raw feature rows")


REQUEST_MODELS: dict[str, type[Strict]] = {"text": TextRequest, "image": ImageRequest, "features": FeaturesRequest}


class Prediction(BaseModel):
    label: str
    score: float = Field(description="softmax probability of the label")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
