"""What a communication hook sent: bytes (in total, in fp32, per link class) and time.

Each hook counts the bytes this rank puts on the wire. For the collectives it runs itself (all-to-all,
all-gather, reduce-scatter) that is exact: ``(W - 1)`` peer messages. For an all-reduce it is the ring-algorithm
volume ``2 (W - 1) / W * numel * itemsize`` (what NCCL's and gloo's ring send per rank).
"""

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class CommStats:
    """What a hook sent. ``bytes_sent`` is the total; ``uncompressed_bytes`` is the part sent in fp32 (warm-up).

    ``intra_node_bytes`` / ``inter_node_bytes`` are only split by the hierarchical hook (flat hooks know no
    topology and leave them 0).
    """

    bytes_sent: int = 0
    uncompressed_bytes: int = 0
    intra_node_bytes: int = 0
    inter_node_bytes: int = 0
    comm_time_s: float = 0.0
    calls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if hasattr(self, name):
                setattr(self, name, type(getattr(self, name))(value))


def ring_allreduce_bytes(numel: int, itemsize: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements."""
    if world_size <= 1:
        return 0
    return int(round(2 * (world_size - 1) / world_size * numel * itemsize))
