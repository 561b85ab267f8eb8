"""Datasets as `DataBundle`s: ``build_data(cfg.data, seed)`` is the only entry point stages use.

`cfg.name` picks a builder from `BUILDERS`: the built-in real sets (bbc_news, fashion_mnist,
digits, lm_text; see shared/DATA.md for where each comes from) and the user formats (csv, jsonl,
image_folder, npz) read from `cfg.path`. Every builder deduplicates before a seeded, stratified
split, so the same config and seed always give the same splits. Pass the saved ``tokenizer`` to
rebuild exactly the inputs a model was trained on instead of training a new one.
"""

from __future__ import annotations

from collections.abc import Callable

from fullchain.config import DataConfig
from fullchain.data.arrays import npz
from fullchain.data.bundle import DataBundle
from fullchain.data.images import digits, fashion_mnist, image_folder
from fullchain.data.lm import lm_text
from fullchain.data.text import bbc_news, table_file
from fullchain.data.tokenizer import TextEncoder

Builder = Callable[[DataConfig, int, TextEncoder | None], DataBundle]

BUILDERS: dict[str, Builder] = {
    "bbc_news": bbc_news,
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "lm_text": lm_text,
    "csv": table_file,
    "jsonl": table_file,
    "image_folder": image_folder,
    "npz": npz,
}


def build_data(cfg: DataConfig, seed: int, encoding: TextEncoder | None = None) -> DataBundle:
    """Load, deduplicate, split and encode the dataset `cfg` names (text with `encoding` when given)."""
    return BUILDERS[cfg.name](cfg, seed, encoding)


__all__ = ["BUILDERS", "DataBundle", "TextEncoder", "build_data"]
