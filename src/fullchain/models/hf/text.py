"""Text to token ids with a pretrained model's own tokenizer (nothing is trained).

transformers' `AutoTokenizer` loads the tokenizer (tokenizer.json, or a vocabulary it converts to a fast
tokenizer); encoding runs on a private copy of its `tokenizers` backend, set up once:

- no padding and no truncation from the file (all-MiniLM-L6-v2's tokenizer.json pads to 128):
  fullchain's collate pads, and truncation is to this encoder's ``max_length``, special tokens included
  (`tokenizers` keeps ``[CLS] ... [SEP]`` whole when it truncates);
- the model's special tokens are added (``[CLS] ... [SEP]`` for BERT), but special tokens written in the
  text are encoded as plain text (as `fullchain.data.tokenizer` does), so user text cannot forge a
  ``[SEP]`` or, for GPT-2, an end-of-text token that doubles as padding.

The encoder pads with the tokenizer's pad token, or its end-of-text token when it has none (GPT-2).
`TextEncoder.preprocessing` is what an artifact records to encode the same way at serving time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fullchain.errors import UserError, one_line
from fullchain.models.hf.quiet import quiet_transformers


class TextEncoder:
    """Encodes texts as unpadded id tensors of at most ``max_length`` tokens; pads with ``pad_id``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, where: str):
        self.tokenizer = tokenizer  # as loaded, so `save` writes the model's tokenizer unchanged
        self.max_length = max_length
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise UserError(f"{where}: the tokenizer has neither a pad token nor an end-of-text token to pad with")
        self.pad_id: int = pad_id
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.encode_special_tokens = True
        specials = self._backend.num_special_tokens_to_add(is_pair=False)
        if max_length <= specials:
            raise UserError(f"{where}: max_length {max_length} leaves no room for text after the tokenizer's "
                            f"{specials} special tokens")
        self._backend.enable_truncation(max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's token ids, special tokens included, as a 1-D LongTensor."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=True)
        return [torch.tensor(encoding.ids, dtype=torch.long) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` without the special tokens `encode` adds (what a client would have sent)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def preprocessing(self) -> dict[str, Any]:
        """What encoding depends on besides the tokenizer files, for an artifact to record."""
        return {"max_length": self.max_length, "pad_id": self.pad_id, "add_special_tokens": True,
                "encode_special_tokens": True}

    def save(self, directory: Path) -> None:
        """Write the tokenizer files (tokenizer.json, tokenizer_config.json) into ``directory``."""
        self.tokenizer.save_pretrained(directory)


def load_text_encoder(directory: Path, max_length: int) -> TextEncoder:
    """The tokenizer in ``directory`` (a checkpoint or a model artifact) as a `TextEncoder`."""
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{directory}: could not load the tokenizer: {one_line(exc)}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{directory}: the tokenizer has no fast (`tokenizers`) form; add a tokenizer.json")
    return TextEncoder(tokenizer, max_length, str(directory))
