"""Gradient communication hooks for DistributedDataParallel: what each rank sends, and how much.

Modules, lowest first; each imports only the ones above it, so there is no import cycle:

- ``counters``: :class:`CommStats` (bytes and time a hook sent) and the ring all-reduce byte volume;
- ``state``: the hook state base class (step, counters, checkpoint form), the per-bucket key, the completed future;
- ``int8_codec``: the INT8 wire format (per-sub-chunk fp32 scales, packed messages, chunk layout);
- ``int8``: the INT8 all-to-all / all-gather all-reduce with error feedback, and its hook;
- ``float_hooks``: fp32 (counted), fp16 and bf16 wires;
- ``powersgd``: PyTorch's PowerSGD with checkpointable state, safe on gloo;
- ``hierarchical``: node topology and the hierarchical all-reduce (INT8 across nodes on request);
- ``register``: picks the hook for a run's ``distributed`` settings and registers it on the DDP model.

Collective support, checked on torch 2.13 with gloo: ``all_to_all_single`` (int8 and fp32),
``reduce_scatter_tensor``, ``all_gather_into_tensor`` (int8) and ``all_reduce`` of bf16 all work, so the same code
runs on gloo and NCCL. The INT8, bf16 and hierarchical hooks run their collectives synchronously from the hook (in
DDP's bucket order, the same on every rank) and return a completed ``torch.futures.Future``.

None of the hook modules uses ``from __future__ import annotations``: ``DistributedDataParallel.register_comm_hook``
checks that a hook's ``bucket`` annotation *is* ``dist.GradBucket``, which a string annotation fails.
"""
