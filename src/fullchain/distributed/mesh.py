"""The device mesh of a run: named parallel dimensions ``replicate x shard x tensor`` over the launched ranks.

``replicate`` copies the (sharded) model (HSDP's outer dimension), ``shard`` shards parameters, gradients and
optimiser state (FSDP2), ``tensor`` splits layers across ranks (tensor parallelism). Ranks that differ only in
their ``tensor`` coordinate see the same data; the data-parallel rank is the (replicate, shard) coordinate.
A dimension the run file leaves unset takes what the world size leaves over (``shard`` first). The mesh itself
is torch's `DeviceMesh` (``init_device_mesh``): rank ``r`` sits at ``(r // (S*T), r // T % S, r % T)``, so the
tensor dimension is innermost, the fastest links on a multi-GPU node.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fullchain.errors import UserError

DIMS = ("replicate", "shard", "tensor")


@dataclass(frozen=True)
class MeshShape:
    replicate: int
    shard: int
    tensor: int

    @property
    def data_parallel(self) -> int:
        return self.replicate * self.shard

    def __str__(self) -> str:
        return f"replicate {self.replicate} x shard {self.shard} x tensor {self.tensor}"


def resolve_shape(replicate: int | None, shard: int | None, tensor: int | None, world_size: int) -> MeshShape:
    """The mesh for `world_size` ranks; unset dimensions fill what is left (shard first, then replicate).

    A product that does not equal the world size is a one-line `UserError` naming ``distributed.mesh``.
    """
    given = {"replicate": replicate, "shard": shard, "tensor": tensor}
    known = math.prod(v for v in given.values() if v is not None)
    free = [name for name in ("shard", "replicate", "tensor") if given[name] is None]
    if world_size % known:
        raise UserError(f"distributed.mesh: {_describe(given)} does not divide the world size {world_size} "
                        "(the number of launched processes)")
    for name in free:
        given[name] = world_size // known if name == free[0] else 1
    shape = MeshShape(**given)
    if shape.data_parallel * shape.tensor != world_size:
        raise UserError(f"distributed.mesh: {shape} = {shape.data_parallel * shape.tensor} ranks, but {world_size} "
                        "processes were launched; make the product equal the world size")
    return shape


def _describe(given: dict[str, int | None]) -> str:
    return " x ".join(f"{k} {v}" for k, v in given.items() if v is not None) or "the mesh"


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """The 3-D `DeviceMesh` with dimensions named `DIMS` (size-1 dimensions are kept: plans index by name).

    Every combination of two or three dimensions with more than one rank each is also flattened into one
    process group, so a DTensor sharded or reduced over several dimensions (the gradient norm of a tensor-
    parallel weight under FSDP2) takes one collective instead of one per dimension.
    """
    mesh = init_device_mesh(device_type, (shape.replicate, shape.shard, shape.tensor), mesh_dim_names=DIMS)
    sizes = dict(zip(DIMS, (shape.replicate, shape.shard, shape.tensor), strict=True))
    for count in (2, 3):
        for dims in itertools.combinations(DIMS, count):
            if all(sizes[d] > 1 for d in dims):
                mesh[dims]._flatten()
    return mesh


def data_coordinate(mesh: DeviceMesh) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size): which slice of each global batch this rank reads."""
    replicate, shard, _ = mesh.get_coordinate()
    r, s, _ = mesh.shape
    return replicate * s + shard, r * s
