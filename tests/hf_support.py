"""Tiny real Hugging Face checkpoints for the tests, written by transformers itself (`save_pretrained`).

- `bert_source`: a 2-layer BERT base model with a WordPiece tokenizer whose tokenizer.json stores padding and
  truncation, like all-MiniLM-L6-v2's;
- `gpt2_source`: a 2-layer GPT-2 base model with a byte-level BPE tokenizer and no pad token (padding falls
  back to end-of-text, as with the real GPT-2);
- `sentence_source`: `bert_source` declaring mean pooling the sentence-transformers way (``modules.json`` ->
  ``1_Pooling/config.json``), as all-MiniLM-L6-v2 does.

Each tokenizer is trained on ``corpus``; the weights are random (from the caller's torch seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedTokenizerFast

from fullchain.models.hf.quiet import quiet_transformers

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park with another dog",
    "hello world, hello again",
    "models read text and predict labels",
    "short text",
    "the quick brown fox jumps over the lazy dog",
] * 4
MAX_POSITIONS = 64


def bert_source(directory: Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 200) -> Path:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    # Like all-MiniLM-L6-v2's tokenizer.json: padding and truncation stored in the file.
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=40)
    tok.enable_truncation(40)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_POSITIONS, pad_token_id=0)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    return save_checkpoint(directory, BertModel(config), fast)


def gpt2_source(directory: Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 300) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=2, n_positions=MAX_POSITIONS,
                        bos_token_id=eos, eos_token_id=eos)  # no pad token: padding falls back to end-of-text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return save_checkpoint(directory, GPT2Model(config), fast)


def sentence_source(directory: Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 200) -> Path:
    bert_source(directory, corpus, vocab_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False}))
    return directory


def save_checkpoint(directory: Path, model, tokenizer) -> Path:
    with quiet_transformers():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory
