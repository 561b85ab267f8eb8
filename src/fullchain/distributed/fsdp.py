"""Strategies `fsdp` and `hybrid`: FSDP2 (``fully_shard``) on the data dimensions of a `DeviceMesh`, tensor
parallelism on its ``tensor`` dimension.

`MeshStrategy.wrap` composes as torchtitan's ``parallelize.py`` does: first the model spec's ``parallelize``
plan turns the layers it names into tensor-parallel DTensor layers on ``mesh["tensor"]``, then every block
of every ``nn.ModuleList`` and finally the root are sharded with ``fully_shard`` over the data dimensions
(``shard``, or ``replicate x shard`` = HSDP), so each block's parameters are gathered just before it runs.
The mixed-precision policy computes in the training precision and reduces gradients in fp32.

Parameters stay whole: `full_model` gathers the full state dict (``get_model_state_dict`` with
``full_state_dict``) into a plain copy of the original module, the ordinary model every later stage reads;
checkpoints go through DCP (`fullchain.train.checkpoint.sharded`), which reshards between meshes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fullchain import metric_names as M
from fullchain.config import DistributedConfig
from fullchain.distributed.balance import ShardedLoadBalancer
from fullchain.distributed.comm.replicas import ReplicaAllReduce
from fullchain.distributed.ddp import ProcessGroupStrategy
from fullchain.distributed.mesh import build_mesh, data_coordinate, resolve_shape
from fullchain.distributed.tensor_parallel import fsdp_shard_placement, fused_layouts, logical_state, physical_state
from fullchain.errors import UserError

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Parallelize = Callable[[nn.Module, Any, Any], nn.Module]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory): its structure."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def shard_blocks(model: nn.Module, mesh: Any, mp_policy: MixedPrecisionPolicy) -> nn.Module:
    """``fully_shard`` each block of each ``nn.ModuleList`` (one all-gather per block), then the root.

    A fused projection (`FusedColwiseParallel`) is sharded on its last dim (`fsdp_shard_placement`)."""
    placement = fsdp_shard_placement(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh, mp_policy=mp_policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, shard_placement_fn=placement)
    return model


class MeshStrategy(ProcessGroupStrategy):
    """FSDP2 over ``replicate x shard`` (HSDP when replicate > 1), tensor parallel over ``tensor`` (hybrid).

    `parallelize` is the model spec's plan ``(model, tensor_mesh, cfg) -> model``; needed when tensor > 1.
    """

    def __init__(self, cfg: DistributedConfig, parallelize: Parallelize | None = None, precision: str = "fp32",
                 model_name: str = "this model"):
        super().__init__(cfg)
        self.shape = resolve_shape(cfg.mesh.replicate, cfg.mesh.shard, cfg.mesh.tensor, self.world_size)
        if self.shape.tensor > 1 and parallelize is None:
            raise UserError(f"distributed.mesh.tensor: {self.shape.tensor} needs a tensor-parallel plan, and "
                            f"{model_name} has none (its model spec's parallelize); use strategy fsdp")
        self.mesh = build_mesh(self.shape, self.device.type)
        self.parallelize = parallelize
        self.mp_policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)
        self._data_rank, self._data_world_size = data_coordinate(self.mesh)
        self._template: nn.Module | None = None
        self.replicas = None  # compression across replicas: FSDP2 shards over `shard` and hands us the all-reduce
        if cfg.compression != "none" and self.shape.replicate > 1:
            self.replicas = ReplicaAllReduce(cfg.compression, self.mesh["replicate"].get_group(), cfg.chunk_size,
                                             cfg.compression_start_step)
            self.comm_state = self.replicas.state

    @property
    def data_rank(self) -> int:
        return self._data_rank

    @property
    def data_world_size(self) -> int:
        return self._data_world_size

    @property
    def data_mesh(self) -> Any:
        """The mesh FSDP2 shards over: ``shard`` alone, or ``replicate x shard`` (HSDP); ``shard`` alone too when
        the all-reduce across replicas is compressed (`ReplicaAllReduce` runs it)."""
        if self.shape.replicate == 1 or self.replicas is not None:
            return self.mesh["shard"]
        return self.mesh["replicate", "shard"]

    def wrap(self, model: nn.Module) -> nn.Module:
        """Tensor-parallel plan, then FSDP2; a model on the meta device is materialised sharded (`materialize`)."""
        self._template = meta_copy(model)
        on_meta = any(p.is_meta for p in model.parameters())
        if not on_meta:
            model = model.to(self.device)
        if self.shape.tensor > 1:
            model = self.parallelize(model, self.mesh["tensor"], self.cfg)
        model = shard_blocks(model, self.data_mesh, self.mp_policy)
        if self.replicas is not None:
            self.replicas.attach(model)
        if on_meta:
            model.to_empty(device=self.device)
        return model

    @property
    def builds_on_meta(self) -> bool:
        """Ranks other than 0 build the model on the meta device; `materialize` fills their shards from rank 0."""
        return True

    def balancer(self, *args) -> ShardedLoadBalancer:
        """Balanced with speeds measured around FSDP2's gathers, FSDP2's own gradient sync."""
        return ShardedLoadBalancer(*args, strategy=self)

    def sync_gradients(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """FSDP2 reduce-scatters in backward; accumulation micro-batches keep unsharded gradients instead."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # FSDP2 and tensor parallelism change the module in place

    def metrics(self, steps: int) -> dict[str, float]:
        """Bytes and time of the compressed all-reduce across replicas (FSDP2's own collectives are not counted)."""
        if self.comm_state is None:
            return {}
        stats = self.comm_state.stats
        return {M.COMM_BYTES_TOTAL: stats.bytes_sent, M.COMM_SECONDS_TOTAL: stats.comm_time_s,
                M.COMM_INTER_NODE_BYTES_TOTAL: stats.bytes_sent}

    def materialize(self, model: nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
        """Fill a wrapped model's shards from `full_state` (whole tensors, needed on rank 0 only: rank 0 sends
        each rank its shard, so no other rank ever holds the whole model)."""
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        own = physical_state(full_state, fused_layouts(model)) if self.is_main else {}
        set_model_state_dict(model, own, options=options)
        for buffer in model.buffers():  # unsharded, and not all in a state dict (non-persistent ones)
            dist.broadcast(buffer, src=0)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Whole CPU tensors on rank 0 (empty elsewhere); collective."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return logical_state(get_model_state_dict(model, options=options), fused_layouts(model))

    def full_model(self, model: nn.Module) -> nn.Module | None:
        state = self.full_state_dict(model)
        if not self.is_main:
            return None
        plain = self._template.to_empty(device="cpu")
        plain.load_state_dict(state)
        self._template = None
        return plain
