"""The INT8 wire format of :mod:`fullchain.distributed.comm.int8`: chunk layout, quantiser, message packing.

A flat tensor of ``numel`` elements is split into ``world_size`` chunks of ``L`` elements (the last one
zero-padded); each chunk is padded to ``Lp = S * chunk_size`` and cut into ``S`` sub-chunks, each with its own fp32
scale (``absmax / 127``). One message per chunk is int8: the first ``L`` payload bytes, then the ``S`` fp32 scales
as raw bytes. Per element, quantisation errs by at most ``scale / 2`` of its sub-chunk.
"""

import math

import torch


def chunk_layout(numel: int, world_size: int, chunk_size: int) -> tuple[int, int, int]:
    """``(L, S, Lp)``: chunk length per rank, sub-chunks per chunk, chunk length padded to sub-chunks."""
    length = max(1, math.ceil(numel / world_size))
    subchunks = math.ceil(length / chunk_size)
    return length, subchunks, subchunks * chunk_size


def quantize_int8(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise rows of ``x`` (shape ``(rows, S * chunk_size)``) with one fp32 scale per sub-chunk.

    Returns ``(q int8 (rows, S * chunk_size), scales fp32 (rows, S))``; ``|x - q * scale| <= scale / 2``.
    """
    rows, cols = x.shape
    v = x.reshape(rows, cols // chunk_size, chunk_size)
    scales = v.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(v / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, chunk_size: int) -> torch.Tensor:
    rows, cols = q.shape
    v = q.reshape(rows, cols // chunk_size, chunk_size).to(torch.float32) * scales.unsqueeze(-1)
    return v.reshape(rows, cols)


def pack_messages(q: torch.Tensor, scales: torch.Tensor, length: int) -> torch.Tensor:
    """One int8 message per row: the first ``length`` payload bytes then the fp32 scales as raw bytes."""
    return torch.cat([q[:, :length], scales.contiguous().view(torch.int8)], dim=1).contiguous()


def unpack_messages(msg: torch.Tensor, length: int, padded: int, chunk_size: int) -> torch.Tensor:
    """The dequantised fp32 rows (shape ``(rows, padded)``, zero past ``length``) of :func:`pack_messages`' output."""
    rows = msg.shape[0]
    q = torch.zeros(rows, padded, dtype=torch.int8, device=msg.device)
    q[:, :length] = msg[:, :length]
    scales = msg[:, length:].contiguous().view(torch.float32)
    return dequantize_int8(q, scales, chunk_size)
