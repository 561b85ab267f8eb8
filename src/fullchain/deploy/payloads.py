"""Request bodies for load and tests, from the held-out split the artifact's model.json records.

Each item is turned back into what a client sends: text decoded from its token ids, images and feature
rows de-normalised to raw values with the recorded statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fullchain.artifact import read_meta, text_encoding
from fullchain.config import DataConfig
from fullchain.data import build_data
from fullchain.deploy.preprocess import SERVABLE_KINDS
from fullchain.errors import UserError


def sample_requests(model_dir: str | Path, n: int = 64, items_per_request: int = 1) -> list[dict]:
    """Up to `n` request bodies of `items_per_request` test items each (cycling when the split is short)."""
    model_dir = Path(model_dir)
    spec = read_meta(model_dir)
    if spec.data is None:
        raise UserError(f"{model_dir}: model.json records no training data to draw sample requests from")
    bundle = build_data(DataConfig.model_validate(spec.data["config"]), spec.data["seed"],
                        text_encoding(model_dir, spec))
    kind = bundle.kind
    if kind not in SERVABLE_KINDS:
        raise UserError(f"{model_dir}: a {kind} model cannot be served")
    pre = spec.preprocessing
    items = []
    for i in range(n * items_per_request):
        x = bundle.test[i % len(bundle.test)][bundle.task.input_names[0]]
        if kind == "text":
            items.append(bundle.encoder.decode(x.tolist()))
        else:
            shape = (-1,) + (1,) * (x.dim() - 1)
            mean, std = torch.tensor(pre["mean"]).view(shape), torch.tensor(pre["std"]).view(shape)
            items.append((x * std + mean).round(decimals=3).tolist())
    field = SERVABLE_KINDS[kind]
    return [{field: items[k:k + items_per_request]} for k in range(0, len(items), items_per_request)]
