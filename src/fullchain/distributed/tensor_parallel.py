"""Tensor-parallel layouts torch's ParallelStyles do not cover: a fused projection, one ``nn.Linear`` whose output
is chunked into equal parts (GPT-2's and nanoGPT's ``c_attn``, ViT's ``qkv``: ``q, k, v = qkv.split(d, -1)``).

Plain ``ColwiseParallel`` gives rank r a contiguous slice of the ``3*d`` outputs, which mixes q, k and v.
`FusedColwiseParallel` (``parts=3``) gives rank r its heads of each part, ``[q_r; k_r; v_r]``, so the model's own
``split`` then works on ``d / tensor`` columns. To do so it registers the Linear's parameters parts-major,
``weight [3d, in]`` as ``[3, d, in]`` and ``bias [3d]`` as ``[3, d]``, and shards dim 1 (each part's rows): an
ordinary ``Shard`` placement, which FSDP2 (sharding the last dim: `fsdp_shard_placement`), ``full_tensor`` and DCP
all handle correctly. Torch's own description of this layout, ``_StridedShard(0, split_factor=3)``, is right for
tensor parallelism alone, but on torch 2.13 it breaks once FSDP2 shards the same parameter: a 1-D bias gets
placements that no longer describe where its elements are (its gathered full state is wrong), and DCP refuses
to save the weight ("overlapping chunks": one chunk per rank, where a rank holds three).

The parameter keeps its name (optimisers and ``named_parameters`` see the same names); only its shape differs,
and no state-dict consumer sees that: `logical_state` / `physical_state` reshape whole tensors (the gathered full
model, rank 0's seed weights) and `LogicalShards` with `LogicalSavePlanner` / `LogicalLoadPlanner` write and read
a shard as the chunks of the ordinary ``[3d, in]`` tensor, so a checkpoint loads on any mesh and in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel

_LAYOUT_ATTR = "_fullchain_fused_parts"  # on a fused Linear: its parts count


@dataclass(frozen=True)
class FusedLayout:
    """One fused parameter: its ordinary (logical) shape and the parts-major shape it is stored in."""

    parts: int
    logical: torch.Size

    @property
    def physical(self) -> torch.Size:
        return torch.Size((self.parts, self.logical[0] // self.parts, *self.logical[1:]))


class FusedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for a Linear whose outputs are `parts` equal blocks (q, k, v): rank r computes
    ``[part_0 rows of r; part_1 rows of r; ...]``. Use it in a plan like any ParallelStyle:
    ``parallelize_module(block, tp_mesh, {"attn.c_attn": FusedColwiseParallel(parts=3), ...})``.
    """

    def __init__(self, parts: int = 3):
        super().__init__()  # its output is local: as a DTensor, it would claim rows that are not where it says
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        self.parts = parts

    def _partition_fused_linear(self, name: str, module: nn.Module, mesh: Any) -> None:
        rows, size = module.out_features // self.parts, mesh.size()
        if module.out_features % self.parts or rows % size:
            raise ValueError(f"FusedColwiseParallel: out_features {module.out_features} is not {self.parts} parts "
                             f"that the tensor-parallel size {size} divides")
        for pname, param in list(module.named_parameters(recurse=False)):
            stored = distribute_tensor(param.detach().unflatten(0, (self.parts, rows)), mesh, [Shard(1)],
                                       src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(stored, requires_grad=param.requires_grad))
        setattr(module, _LAYOUT_ATTR, self.parts)

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"FusedColwiseParallel shards an nn.Linear, not {type(module).__name__}")
        module.forward = partial(_fused_linear_forward, module)
        return distribute_module(module, device_mesh, self._partition_fused_linear,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _fused_linear_forward(module: nn.Linear, x: DTensor) -> DTensor:
    """The Linear on this rank's rows: the local ``[parts, rows/T, ...]`` blocks, flattened, are the rows of a
    column-parallel weight, so DTensor's Linear computes them (and all-reduces the input gradient)."""

    def rows(param: DTensor | None) -> DTensor | None:
        if param is None:
            return None
        return DTensor.from_local(param.to_local().flatten(0, 1), param.device_mesh, [Shard(0)], run_check=False)

    return F.linear(x, rows(module.weight), rows(module.bias))


def fused_layouts(model: nn.Module) -> dict[str, FusedLayout]:
    """``{parameter name: FusedLayout}`` of every parameter `FusedColwiseParallel` stores parts-major."""
    layouts = {}
    for prefix, module in model.named_modules():
        parts = getattr(module, _LAYOUT_ATTR, None)
        if parts is None:
            continue
        for name, param in module.named_parameters(recurse=False):
            logical = torch.Size((param.shape[0] * param.shape[1], *param.shape[2:]))
            layouts[f"{prefix}.{name}" if prefix else name] = FusedLayout(parts, logical)
    return layouts


def fsdp_shard_placement(model: nn.Module) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP2's ``shard_placement_fn``: a fused parameter is sharded on its last dim (its dim 0 is the 3 parts,
    which would shard unevenly over the data ranks); every other parameter keeps FSDP2's default (dim 0)."""
    fused = {id(p) for m in model.modules() if hasattr(m, _LAYOUT_ATTR) for p in m.parameters(recurse=False)}
    return lambda param: Shard(param.ndim - 1) if id(param) in fused else None


def logical_shape(value: torch.Tensor, layout: FusedLayout | None) -> torch.Size:
    """The shape `value` (a parameter, or optimiser state shaped like one) has in state dicts and checkpoints."""
    return layout.logical if layout is not None and value.shape == layout.physical else value.shape


def logical_state(state: dict[str, Any], layouts: dict[str, FusedLayout]) -> dict[str, Any]:
    """Whole tensors in the ordinary shapes (a gathered full state dict, ready for the plain model)."""
    return {k: v.reshape(layouts[k].logical) if _has_shape(v, layouts.get(k), "physical") else v
            for k, v in state.items()}


def physical_state(state: dict[str, Any], layouts: dict[str, FusedLayout]) -> dict[str, Any]:
    """Whole tensors in the parts-major shapes of a model parallelised with `FusedColwiseParallel`."""
    return {k: v.reshape(layouts[k].physical) if _has_shape(v, layouts.get(k), "logical") else v
            for k, v in state.items()}


def _has_shape(value: Any, layout: FusedLayout | None, which: str) -> bool:
    return layout is not None and isinstance(value, torch.Tensor) and value.shape == getattr(layout, which)


class LogicalShards:
    """This rank's shard of a parts-major DTensor, presented to DCP as chunks of the ordinary tensor.

    The DTensor's own (ordinary) placements give its block ``[p0:p0+n, r0:r0+m, ...]`` of the ``[parts, rows,
    ...]`` tensor; part ``p0 + j`` of it is the chunk at row ``(p0 + j) * rows + r0`` of the ``[parts*rows, ...]``
    tensor, and the local tensor's slice ``[j]`` holds it. DCP writes from and reads into those slices in place.
    """

    def __init__(self, tensor: DTensor, layout: FusedLayout):
        self.tensor, self.layout = tensor, layout
        (block,) = tensor.__create_chunk_list__()  # DTensor's own (DCP) description of its local block
        offsets, local, rows = block.offsets, tensor.to_local(), layout.physical[1]
        self._chunks = {}
        for j in range(block.sizes[0]):
            at = torch.Size(((offsets[0] + j) * rows + offsets[1], *offsets[2:]))
            self._chunks[at] = (ChunkStorageMetadata(offsets=at, sizes=block.sizes[1:]), local[j])

    def size(self) -> torch.Size:
        return self.layout.logical

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, at), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(view),
                                                      size=self.layout.logical))
                for at, (chunk, view) in self._chunks.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [chunk for chunk, _ in self._chunks.values()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._chunks[index.offset][1]


def as_logical(state: dict[str, Any], layouts: dict[str, FusedLayout]) -> dict[str, Any]:
    """`state` as DCP must see it: each parts-major tensor named in `layouts` in its ordinary shape, a DTensor
    as `LogicalShards`, a whole tensor as a view (either way DCP reads into the tensor itself)."""
    out = {}
    for key, value in state.items():
        layout = layouts.get(key)
        if not _has_shape(value, layout, "physical"):
            out[key] = value
        elif isinstance(value, DTensor):
            out[key] = LogicalShards(value, layout)
        else:
            out[key] = value.view(layout.logical)
    return out


def _lookup(state: dict[str, Any], index: MetadataIndex) -> torch.Tensor | None:
    value = state.get(index.fqn)
    return value.__get_tensor_shard__(index) if isinstance(value, LogicalShards) else None


def _take_shards(tree: dict[str, Any], prefix: str = "") -> dict[str, LogicalShards]:
    """Remove the `LogicalShards` values of a nested state dict; returns them under DCP's flattened keys."""
    found = {}
    for key, value in list(tree.items()):
        if isinstance(value, LogicalShards):
            found[prefix + key] = tree.pop(key)
        elif isinstance(value, dict):
            found.update(_take_shards(value, f"{prefix}{key}."))
    return found


class LogicalSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, which also finds the data of a `LogicalShards` chunk."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = _lookup(self.state_dict, index)
        return super().lookup_object(index) if found is None else found


class LogicalLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, which also finds the destination of a `LogicalShards` chunk.

    Its set-up replaces every value that is not a tensor with None (in place), so `LogicalShards` values join the
    flattened state dict after it, under the same dotted keys."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        shards = _take_shards(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.state_dict.update(shards)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = _lookup(self.state_dict, index)
        return super().lookup_tensor(index) if found is None else found
