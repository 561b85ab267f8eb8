"""The Transformer stack shared by `TransformerClassifier` and `CausalLM`.

Attention is written out by hand on purpose: separate ``q_proj``/``k_proj``/``v_proj`` Linears,
``q @ k^T / sqrt(head_dim)``, an additive mask, softmax, dropout, ``@ v``, ``out_proj``. This is the
pattern that people write in their own models, and it is what the graph passes in
``fullchain.optimize`` find and fuse into ``scaled_dot_product_attention`` (MISSION C3). Using
``nn.MultiheadAttention`` or SDPA here would leave those passes nothing to do on our own models.

Masks are additive and use ``torch.finfo(dtype).min`` rather than ``-inf``: a row whose keys are all
masked (a fully padded sequence) then softmaxes to a uniform row instead of NaN. Padding and causal
masks are combined as booleans first and turned into one additive bias, so two large negatives are
never added together (which would overflow to ``-inf``).

The bias is built once per forward by `attention_bias`, which is registered with ``torch.fx.wrap``:
``torch.fx.symbolic_trace`` keeps it as one opaque call (it asks for ``torch.finfo`` of a dtype,
which a symbolic tracer cannot answer), while ``torch.export`` traces straight through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Token id 0 is padding; this equals fullchain.data.bundle.PAD_ID (a test checks it). It is repeated
# here so that loading a model never imports the data stack.
PAD_ID = 0


def attention_bias(
    ids: torch.Tensor, like: torch.Tensor, causal: bool, mask_padding: bool
) -> torch.Tensor | None:
    """Additive attention bias for token ids ``[B, T]``, broadcastable to scores ``[B, H, T, T]``.

    Blocked positions get ``torch.finfo(like.dtype).min``, allowed ones 0. Padding blocks keys whose
    id is `PAD_ID` (shape ``[B, 1, 1, T]``); causal blocks keys after the query (``[1, 1, T, T]``).
    Returns None when nothing is masked.
    """
    blocked = None
    if mask_padding:
        blocked = (ids == PAD_ID)[:, None, None, :]
    if causal:
        t = ids.size(1)
        future = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)[None, None]
        blocked = future if blocked is None else (blocked | future)
    if blocked is None:
        return None
    bias = torch.zeros(blocked.shape, dtype=like.dtype, device=like.device)
    return bias.masked_fill(blocked, torch.finfo(like.dtype).min)


torch.fx.wrap("attention_bias")


class SelfAttention(nn.Module):
    """Multi-head self-attention, written out explicitly (see the module docstring for why)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, T, d_model]``; ``bias``: additive mask broadcastable to ``[B, H, T, T]``."""
        b, t = x.size(0), x.size(1)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        attn = F.softmax(scores, dim=-1)
        attn = self.attn_dropout(attn)
        out = attn @ v  # [B, H, T, head_dim]
        out = out.transpose(1, 2).reshape(b, t, self.d_model)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear -> Dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + Dropout(Attn(LN(x)))`` then ``x + FF(LN(x))`` (stable without warm-up tricks)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.attn_out_dropout = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_out_dropout(self.attn(self.ln1(x), bias))
        return x + self.ff(self.ln2(x))


class TransformerEncoder(nn.Module):
    """Token + learned position embeddings, ``n_layers`` pre-LN blocks and a final LayerNorm.

    ``forward(ids [B, T]) -> hidden [B, T, d_model]``. ``causal`` masks future keys (language models);
    ``mask_padding`` masks keys whose id is `PAD_ID` (classifiers over right-padded text). Sequences
    must not be longer than ``max_length`` (the position table's size).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        max_length: int,
        dropout: float = 0.0,
        causal: bool = False,
        mask_padding: bool = True,
    ):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_heads", n_heads),
                           ("d_ff", d_ff), ("max_length", max_length)):
            if int(value) < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        if n_layers < 0:
            raise ValueError(f"n_layers must be at least 0, got {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.causal = bool(causal)
        self.mask_padding = bool(mask_padding)
        self.max_length = max_length
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_length, d_model)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(_init_weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.size(1), device=ids.device)
        h = self.emb_dropout(self.tok_emb(ids) + self.pos_emb(positions))
        bias = attention_bias(ids, h, self.causal, self.mask_padding)
        for block in self.blocks:
            h = block(h, bias)
        return self.ln_f(h)


def parallelize_blocks(encoder: TransformerEncoder, tp_mesh, cfg=None) -> TransformerEncoder:
    """Megatron-style tensor parallelism of every block on `tp_mesh` (torch's ParallelStyles).

    Q, K, V and the first MLP layer are column-parallel (each rank computes its heads / hidden units), the
    attention output and the second MLP layer row-parallel (their partial sums are all-reduced), so one block
    costs two all-reduces forward and two backward. Embeddings, norms and heads stay replicated across
    `tp_mesh` (FSDP2 shards them on the data dimensions). Each rank's attention then holds
    ``n_heads / tensor`` heads, which the head count must divide.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size = tp_mesh.size()
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.out_proj": RowwiseParallel(), "ff.fc1": ColwiseParallel(), "ff.fc2": RowwiseParallel()}
    for block in encoder.blocks:
        attn = block.attn
        if attn.n_heads % size or block.ff.fc1.out_features % size:
            raise ValueError(f"tensor parallel size {size} must divide n_heads ({attn.n_heads}) and d_ff "
                             f"({block.ff.fc1.out_features})")
        parallelize_module(block, tp_mesh, plan)
        attn.n_heads, attn.d_model = attn.n_heads // size, attn.d_model // size
    return encoder


def parallelize_encoder_model(model: nn.Module, tp_mesh, cfg=None) -> nn.Module:
    """The model spec's ``parallelize`` hook for models built around ``model.encoder`` (classifier, causal LM)."""
    parallelize_blocks(model.encoder, tp_mesh, cfg)
    return model


def _init_weights(module: nn.Module) -> None:
    """GPT/BERT-style init: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
