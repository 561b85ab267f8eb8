"""Subword tokenizers trained on the training split, and the one way text becomes token ids.

The `tokenizers` library does the work (WordPiece with BERT normalisation and pre-tokenisation,
or byte-level BPE). Special tokens come first so ``[PAD]`` is id 0 (what `DataBundle.collate`
pads with), then ``[UNK]`` and ``[CLS]``. No padding or truncation is stored in the tokenizer:
`encode_texts` truncates, and it also makes a literal "[PAD]" in user text encode as ordinary
characters, so id 0 only ever means padding. Training and serving must both encode through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fullchain.config import TokenizerConfig
from fullchain.tasks import PAD_ID

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = [PAD, UNK, CLS]


def train_tokenizer(texts: Sequence[str], cfg: TokenizerConfig) -> Tokenizer:
    """A `cfg.kind` tokenizer with at most `cfg.vocab_size` tokens learnt from ``texts``."""
    if cfg.kind == "bpe":
        return _train_byte_level_bpe(texts, cfg)
    return _train_wordpiece(texts, cfg)


def _train_byte_level_bpe(texts: Sequence[str], cfg: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _wordpiece(cfg: TokenizerConfig, vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _train_wordpiece(texts: Sequence[str], cfg: TokenizerConfig) -> Tokenizer:
    """WordPiece made deterministic around a known trainer bug (huggingface/tokenizers#1794).

    The trainer creates the word-continuation tokens (``##a``) in hash-map order, and their ids
    break ties between equally frequent merges, so one corpus can give different vocabularies
    run to run. Declaring every possible ``##<char>`` up front (as trainer special tokens, in
    sorted order) fixes those ids. The learnt vocabulary then goes into a fresh tokenizer with
    sorted ids and only the three real special tokens; WordPiece only tests membership, so the
    order changes no tokenisation.
    """
    scratch = _wordpiece(cfg, {})
    chars = {c for raw in set("".join(texts)) for c in scratch.normalizer.normalize_str(raw)}
    # A character continues a word unless the pre-tokenizer splits it off (punctuation, space).
    prefix = "##"
    continuations = [
        prefix + c for c in sorted(chars) if len(scratch.pre_tokenizer.pre_tokenize_str(c + c)) == 1
    ]
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS + continuations,
        continuing_subword_prefix=prefix,
        show_progress=False,
    )
    scratch.train_from_iterator(texts, trainer=trainer, length=len(texts))
    learnt = sorted(set(scratch.get_vocab()) - set(SPECIAL_TOKENS))
    tokenizer = _wordpiece(cfg, {token: i for i, token in enumerate(SPECIAL_TOKENS + learnt)})
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


class TextEncoder(Protocol):
    """What turns texts into a model's token ids, identically for training data, evaluation data and requests:
    `TextEncoding` for tokenizers trained here, `fullchain.models.hf.TextEncoder` for a pretrained model's own."""

    max_length: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def preprocessing(self) -> dict[str, Any]: ...

    def save(self, directory: Path) -> None: ...


@dataclass
class TextEncoding:
    """A tokenizer trained here: no special tokens, ids cut at `max_length`, padded later with `pad_id`."""

    tokenizer: Tokenizer
    max_length: int
    pad_id: int = PAD_ID

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return encode_texts(self.tokenizer, texts, self.max_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def preprocessing(self) -> dict[str, Any]:
        """What model.json records so that `from_preprocessing` encodes exactly the same way later."""
        return {"max_length": self.max_length, "pad_id": self.pad_id}

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(Path(directory) / "tokenizer.json"))

    @classmethod
    def from_preprocessing(cls, pre: dict, tokenizer: Tokenizer) -> TextEncoding:
        return cls(tokenizer, int(pre["max_length"]), int(pre.get("pad_id", PAD_ID)))


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int | None = None
) -> list[torch.Tensor]:
    """Token ids of each text as a 1-D LongTensor, cut to ``max_length`` when given."""
    tokenizer.encode_special_tokens = True
    encodings = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [torch.tensor(e.ids[:max_length], dtype=torch.long) for e in encodings]
