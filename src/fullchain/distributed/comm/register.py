"""Choose the communication hook for a run's ``distributed`` settings and register it on the DDP model.

``DistributedDataParallel.register_comm_hook`` takes one hook and its state; this module maps the names a run
file uses (``distributed.compression``, ``distributed.hierarchical``) to the hook and state of the other modules
of this package, and returns the state so that the strategy can checkpoint it and read its counters.
"""

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist

from fullchain.distributed.comm.float_hooks import AllreduceHookState, Bf16HookState, bf16_hook, counting_allreduce_hook
from fullchain.distributed.comm.hierarchical import HierarchicalHookState, build_topology, hierarchical_hook
from fullchain.distributed.comm.int8 import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_START_STEP, Int8HookState, int8_hook
from fullchain.distributed.comm.powersgd import PowerSGDHookState, powersgd_hook
from fullchain.distributed.comm.state import HookState
from fullchain.errors import UserError

CompressionName = Literal["none", "fp16", "bf16", "powersgd", "int8"]
COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd", "int8")


def register_compression(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    name: CompressionName,
    process_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression_start_step: int = DEFAULT_COMPRESSION_START_STEP,
    procs_per_node: int | None = None,
    hierarchical: bool = False,
    error_feedback: bool = True,
    powersgd_rank: int = 1,
) -> HookState:
    """Register the communication hook for ``name`` on ``ddp_model`` and return its state object.

    ``hierarchical=True`` (with ``name`` ``none`` or ``int8``) uses the hierarchical all-reduce over nodes of
    ``procs_per_node`` consecutive ranks (default: torchrun's ``LOCAL_WORLD_SIZE``); ``int8`` then compresses the
    inter-node all-reduce.
    """
    if name not in COMPRESSIONS:
        raise UserError(f"distributed.compression must be one of {', '.join(COMPRESSIONS)}; got {name!r}")
    hook: Callable
    state: HookState
    if hierarchical:
        if name not in ("none", "int8"):
            raise UserError(f"hierarchical all-reduce supports compression none or int8, not {name!r}")
        if process_group not in (None, dist.group.WORLD):
            raise UserError("hierarchical all-reduce runs over the default (world) process group only")
        topology = build_topology(procs_per_node)
        state = HierarchicalHookState(
            topology,
            int8_inter_node=name == "int8",
            chunk_size=chunk_size,
            compression_start_step=compression_start_step,
            error_feedback=error_feedback,
        )
        hook = hierarchical_hook
    elif name == "int8":
        state = Int8HookState(process_group, chunk_size, compression_start_step, error_feedback)
        state.param_index = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
        hook = int8_hook
    elif name == "bf16":
        state, hook = Bf16HookState(process_group), bf16_hook
    elif name in ("none", "fp16"):
        dtype = torch.float32 if name == "none" else torch.float16
        state, hook = AllreduceHookState(process_group, dtype), counting_allreduce_hook
    else:  # powersgd
        backend = dist.get_backend(process_group)
        state = PowerSGDHookState(
            process_group,
            synchronous=backend != "nccl",
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(2, compression_start_step),
            use_error_feedback=True,
            warm_start=True,
        )
        hook = powersgd_hook
    ddp_model.register_comm_hook(state, hook)
    return state
