"""What a communication hook sent: bytes (in total, in fp32, per link class) and time.

Each hook counts the bytes this rank puts on the wire. For the collectives it runs itself (all-to-all,
all-gather, reduce-scatter) that is exact: ``(W - 1)`` peer messages. For an all-reduce it is the ring-algorithm
volume ``2 (W - 1) / W * numel * itemsize`` (what NCCL's and gloo's ring send per rank).
`tcp_bytes_sent` is the kernel's own count of what this process sent over TCP (gloo's connections included):
a measurement on the wire to check those counts against, for every hook and for DDP's native all-reduce.
"""

import os
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

_TCPI_BYTES_SENT = slice(200, 208)  # struct tcp_info's __u64 tcpi_bytes_sent (Linux >= 4.19)


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


def tcp_bytes_sent() -> int | None:
    """Payload bytes sent so far by this process's open TCP sockets, as the kernel counts them (TCP_INFO).

    Covers every TCP connection of the process (gloo's peers, the rendezvous store, an exporter if one runs);
    None where the kernel does not report it (not Linux, or older than 4.19).
    """
    total = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:  # a duplicate: closing it leaves the connection
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except (OSError, ValueError):
            continue
        if len(info) < _TCPI_BYTES_SENT.stop:
            return None
        total += int.from_bytes(info[_TCPI_BYTES_SENT], sys.byteorder)
    return total
