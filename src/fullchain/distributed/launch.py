"""`ds train --nproc-per-node N`: start the run under torchrun (elastic rendezvous, restarts on failure).

Each worker runs `python -m fullchain.cli.worker RUN.yaml ...`. A restarted worker resumes from the
newest valid checkpoint by itself. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 works around a torch 2.13 + gloo trap:
with torchrun's shared rendezvous store, restarted workers read the dead group's addresses and never connect.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    config: Path,
    overrides: list[str],
    resume: str | None,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    local_addr: str | None = None,
    allow_fresh: bool = False,
) -> list[str]:
    endpoint = rdzv_endpoint or f"127.0.0.1:{free_port()}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        *([f"--local-addr={local_addr}"] if local_addr else []),
        # torchrun recognises the rendezvous host by its hostname; an address of a network namespace
        # (the emulated cluster) it does not, so the node that owns the endpoint says so itself.
        *(["--rdzv-conf=is_host=1"] if local_addr and endpoint.rpartition(":")[0] == local_addr else []),
        "-m", "fullchain.cli.worker", str(config),
    ]
    for assignment in overrides:
        cmd += ["--set", assignment]
    if resume:
        cmd += ["--resume", resume]
    if allow_fresh:
        cmd.append("--allow-fresh")
    return cmd


def launch(config: Path, overrides: list[str], resume: str | None, **torchrun_args) -> int:
    """Run torchrun to completion; returns its exit code (non-zero when the group failed for good)."""
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // torchrun_args.get("nproc_per_node", 1))))}
    return subprocess.run(torchrun_command(config, overrides, resume, **torchrun_args), env=env).returncode
