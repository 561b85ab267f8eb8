"""``lm_text``: a causal language-modelling stream over BBC News.

Articles are deduplicated and split by story (headline), so no article leaks across splits, the
tokenizer is trained on the train articles, and each split becomes one token stream in which
every article starts with ``[CLS]`` (the document-boundary token). The stream is cut into
non-overlapping blocks of ``block_size + 1`` tokens; a sample is ``(block[:-1], block[1:])``.
The tail shorter than a block is dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from fullchain.config import DataConfig
from fullchain.data.bundle import PAD_ID, DataBundle
from fullchain.data.samples import Pairs, encode_labels
from fullchain.data.text import headline, plan_text, read_bbc_news, text_preprocessing
from fullchain.data.tokenizer import CLS, TextEncoder, TextEncoding, encode_texts
from fullchain.errors import UserError
from fullchain.tasks.causal_lm import TOKENS, CausalLanguageModelling


def token_blocks(tokenizer: Tokenizer, texts: list[str], block_size: int, split_name: str) -> Pairs:
    """Next-token pairs from the concatenated, ``[CLS]``-separated token ids of ``texts``."""
    boundary = torch.tensor([tokenizer.token_to_id(CLS)])
    stream = torch.cat([piece for ids in encode_texts(tokenizer, texts) for piece in (boundary, ids)])
    n_blocks = len(stream) // (block_size + 1)
    if n_blocks == 0:
        raise UserError(
            f"lm_text: the {split_name} split has {len(stream)} tokens, fewer than one block of "
            f"{block_size + 1}; lower data.block_size or raise data.max_samples"
        )
    blocks = stream[: n_blocks * (block_size + 1)].view(n_blocks, block_size + 1)
    return Pairs(blocks[:, :-1], blocks[:, 1:], TOKENS)


def lm_text(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    texts, topics = read_bbc_news()
    labels, _ = encode_labels(topics)  # topics only stratify the document split
    if encoding is not None:  # keep the recorded tokenizer, with this run's block size
        encoding = TextEncoding(encoding.tokenizer, cfg.block_size)
    split, encoding = plan_text(texts, labels, cfg, seed, encoding, groups=[headline(t) for t in texts])
    tokenizer = encoding.tokenizer

    def blocks(idx: np.ndarray | None, name: str) -> Pairs | None:
        return None if idx is None else token_blocks(tokenizer, [texts[i] for i in idx], cfg.block_size, name)

    return DataBundle(
        train=blocks(split.train, "train"),
        val=blocks(split.val, "val"),
        test=blocks(split.test, "test"),
        kind="lm",
        label_names=[],
        task=CausalLanguageModelling(tokenizer.get_vocab_size(), cfg.block_size, PAD_ID),
        input_spec={"vocab_size": tokenizer.get_vocab_size(), "max_length": cfg.block_size, "pad_id": PAD_ID},
        preprocessing={
            "kind": "lm",
            "bos_id": tokenizer.token_to_id(CLS),
            **text_preprocessing(cfg, TextEncoding(tokenizer, cfg.block_size)),
        },
        encoder=TextEncoding(tokenizer, cfg.block_size),
    )
