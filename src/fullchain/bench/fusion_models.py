"""Models from outside fullchain's code for `fullchain.bench.fusion` (and its tests): attention written in the
styles people use, ``transformers`` BERT / GPT-2 / DistilBERT built from small configs with random weights
(nothing is downloaded) and ``nn.TransformerEncoderLayer``.

Every model here is called as ``model(x, keep)``: ``x`` is ``[B, T, D]`` hidden states (token ids ``[B, T]``
for the ``transformers`` models) and ``keep`` a ``[B, T]`` mask of real tokens (bool, or 0/1 integers for
``transformers``); causal styles ignore ``keep``. Each style is written the way its namesake writes it, not
the way our passes would like it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, HEADS, LONGEST = 256, 4, 2048


class _Projections(nn.Module):
    def __init__(self, d: int = D, heads: int = HEADS, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, self.kv_heads * self.head_dim)
        self.v = nn.Linear(d, self.kv_heads * self.head_dim)
        self.o = nn.Linear(d, d)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, h*d] -> [B, h, T, d]
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d] -> [B, T, h*d]
        b, _, t, _ = x.shape
        return self.o(x.transpose(1, 2).reshape(b, t, -1))


class GPT2SlicedCausal(_Projections):
    """GPT-2 (before SDPA): causal mask sliced from a registered buffer by the traced length, ``torch.where`` with
    ``finfo.min``, a scale computed from a traced size."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(LONGEST, LONGEST, dtype=torch.bool))[None, None],
                             persistent=False)

    def forward(self, x, keep):
        q, k, v = (self.split(p(x), self.heads) for p in (self.q, self.k, self.v))
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
        t = q.size(-2)
        causal = self.bias[:, :, :t, :t]
        w = torch.where(causal, w, torch.finfo(w.dtype).min)
        w = nn.functional.softmax(w, dim=-1)
        return self.merge(torch.matmul(w, v))


class BertFinfoMask(_Projections):
    """BERT: the extended mask ``(1 - mask) * finfo(dtype).min`` added to scaled scores, dropout on the
    probabilities."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, keep):
        extended = (1.0 - keep[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        q, k, v = (self.split(p(x), self.heads) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + extended
        return self.merge(torch.matmul(self.dropout(scores.softmax(-1)), v))


class BaddbmmThreeD(_Projections):
    """Bloom / GPT-NeoX style: 3-D ``[B*h, T, d]`` tensors, ``baddbmm`` into a ``torch.zeros(B * h, T, T)``
    from traced sizes with the scale as ``alpha``, a ``masked_fill`` of padding with -1e4, ``bmm`` with V."""

    def forward(self, x, keep):
        b, t, _ = x.shape
        q, k, v = (self.split(p(x), self.heads).reshape(b * self.heads, t, self.head_dim)
                   for p in (self.q, self.k, self.v))
        scores = torch.baddbmm(torch.zeros(b * self.heads, t, t, dtype=x.dtype), q, k.transpose(1, 2),
                               beta=0.0, alpha=1.0 / math.sqrt(self.head_dim))
        blocked = (~keep).repeat_interleave(self.heads, dim=0)[:, None, :]
        probs = F.softmax(scores.masked_fill(blocked, -1e4), dim=-1)
        return self.merge(torch.bmm(probs, v).view(b, self.heads, t, self.head_dim))


class EinsumHeadsLast(_Projections):
    """einsum on ``[B, T, h, d]`` tensors (heads after the sequence), a boolean mask filled with ``-inf``."""

    def forward(self, x, keep):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
        return self.o(out.reshape(b, t, -1))


class T5Fp32Softmax(_Projections):
    """T5: no scale, a learned relative position bias plus the padding mask added to the scores, softmax in
    fp32 and cast back."""

    def __init__(self, buckets: int = 32):
        super().__init__()
        self.buckets = buckets
        self.relative = nn.Embedding(buckets, self.heads)

    def position_bias(self, t: int, dtype: torch.dtype) -> torch.Tensor:
        pos = torch.arange(t)
        distance = (pos[None, :] - pos[:, None]).clamp(-(self.buckets // 2), self.buckets // 2 - 1) + self.buckets // 2
        return self.relative(distance).permute(2, 0, 1)[None].to(dtype)  # [1, h, T, T]

    def forward(self, x, keep):
        q, k, v = (self.split(p(x), self.heads) for p in (self.q, self.k, self.v))
        bias = self.position_bias(x.size(1), x.dtype) + (~keep[:, None, None, :]).to(x.dtype) * -1e9
        scores = torch.matmul(q, k.transpose(3, 2))
        scores += bias
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.merge(torch.matmul(weights, v))


class ScaleInQuery(_Projections):
    """The scale folded into the query, ``k.mT``, ``masked_fill`` of padding with -1e9 (finite)."""

    def forward(self, x, keep):
        q, k, v = (self.split(p(x), self.heads) for p in (self.q, self.k, self.v))
        q = q * self.head_dim ** -0.5
        scores = (q @ k.mT).masked_fill(~keep[:, None, None, :], -1e9)
        return self.merge(torch.softmax(scores, dim=-1) @ v)


class GroupedQuery(_Projections):
    """Grouped-query attention as Llama writes it: K and V with fewer heads, ``repeat_kv`` (expand + reshape),
    an additive causal mask of ``finfo.min``."""

    def __init__(self):
        super().__init__(kv_heads=HEADS // 2)

    @staticmethod
    def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
        b, h, t, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)

    def forward(self, x, keep):
        t = x.size(1)
        q = self.split(self.q(x), self.heads)
        k, v = (self.repeat_kv(self.split(p(x), self.kv_heads), self.heads // self.kv_heads) for p in (self.k, self.v))
        causal = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5 + causal
        return self.merge(torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v))


class TorchEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (PyTorch's own; it calls SDPA already) with a key padding mask."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, HEADS, 4 * D, dropout=0.1, batch_first=True)

    def forward(self, x, keep):
        return self.layer(x, src_key_padding_mask=~keep)


STYLES = {
    "gpt2_sliced_causal": GPT2SlicedCausal,
    "bert_finfo_mask": BertFinfoMask,
    "baddbmm_3d": BaddbmmThreeD,
    "einsum_heads_last": EinsumHeadsLast,
    "t5_fp32_softmax": T5Fp32Softmax,
    "scale_in_query": ScaleInQuery,
    "grouped_query": GroupedQuery,
}


class HFEncoder(nn.Module):
    """A ``transformers`` base model behind ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


VOCAB = 1000


def hf_model(name: str, layers: int = 2) -> HFEncoder:
    """A small random-weight ``transformers`` model with the explicit ("eager") attention, as users run it."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model

    common = {"vocab_size": VOCAB, "attn_implementation": "eager"}
    if name == "hf_bert":
        hf = BertModel(BertConfig(hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS,
                                  intermediate_size=4 * D, max_position_embeddings=LONGEST, **common),
                       add_pooling_layer=False)
    elif name == "hf_gpt2":
        hf = GPT2Model(GPT2Config(n_embd=D, n_layer=layers, n_head=HEADS, n_positions=LONGEST, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, **common))
    elif name == "hf_distilbert":
        hf = DistilBertModel(DistilBertConfig(dim=D, n_layers=layers, n_heads=HEADS, hidden_dim=4 * D,
                                              max_position_embeddings=LONGEST, **common))
    else:
        raise KeyError(name)
    return HFEncoder(hf).eval()


HF_MODELS = ("hf_bert", "hf_gpt2", "hf_distilbert")


def inputs(name: str, batch: int, length: int, seed: int = 0, empty_row: bool = False) -> tuple[torch.Tensor, ...]:
    """``(x, keep)`` for a style or ``(input_ids, attention_mask)`` for a ``transformers`` model; the last row is
    padded to half its length, or entirely with ``empty_row``."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        keep[-1, 0 if empty_row else max(1, length // 2):] = False
    if name in HF_MODELS:
        return torch.randint(1, VOCAB, (batch, length), generator=g), keep.long()
    return torch.randn(batch, length, D, generator=g), keep


def edge_inputs(name: str, longest: int = LONGEST) -> list[tuple[torch.Tensor, ...]]:
    """A padding-only row beside a full one, a single token, the longest length."""
    return [inputs(name, 2, 16, seed=1, empty_row=True), inputs(name, 1, 1, seed=2), inputs(name, 1, longest, seed=3)]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in HF_MODELS:
        return hf_model(name)
    if name == "torch_encoder_layer":
        return TorchEncoderLayer().eval()
    return STYLES[name]().eval()


EXTERNAL = (*HF_MODELS, "torch_encoder_layer", *STYLES)
