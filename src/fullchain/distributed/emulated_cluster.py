"""An emulated cluster on one Linux machine: N "nodes" as network namespaces behind a rate-limited switch.

Each node is a namespace `fc-nodeI` with address 10.77.0.(I+1) on a veth pair whose other end sits on a
bridge in namespace `fc-switch`. `tc ... tbf` limits both directions of every node's link (this kernel has
tbf but no netem: bandwidth only, no added delay). Ranks inside one namespace talk through its loopback
(fast), ranks on different nodes through the limited link - the shape of a real cluster. Needs root.

    python -m fullchain.distributed.emulated_cluster up --nodes 2 --rate 100mbit
    ip netns exec fc-node0 env GLOO_SOCKET_IFNAME=fcv0 ds train run.yaml --nproc-per-node 2 --nnodes 2 \\
        --node-rank 0 --rdzv-endpoint 10.77.0.1:29400 --local-addr 10.77.0.1
    (and the same in fc-node1 with --node-rank 1 --local-addr 10.77.0.2)
    python -m fullchain.distributed.emulated_cluster down

Nothing leaves the machine: the addresses exist only inside namespaces this module creates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fullchain.errors import UserError

SWITCH = "fc-switch"
SUBNET = "10.77.0"


def node_ns(i: int) -> str:
    return f"fc-node{i}"


def node_ip(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


def node_ifname(i: int) -> str:
    return f"fcv{i}"


def available() -> str | None:
    """None when the cluster can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2 (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "add", "fc-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "fc-probe"], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"emulated cluster: `{' '.join(cmd)}` failed: {done.stderr.strip()}")


def _limit(ns: str, dev: str, rate: str) -> None:
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
           "burst", "256kb", "latency", "100ms"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"emulated cluster: `{' '.join(cmd)}` failed: {done.stderr.strip()}")


def down() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name == SWITCH or name.startswith("fc-node"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def up(nodes: int, rate: str) -> None:
    """Build `nodes` namespaces on one switch, each link limited to `rate` (tc syntax: 1gbit, 100mbit)."""
    reason = available()
    if reason:
        raise UserError(f"emulated cluster: {reason}")
    down()
    _ip("netns", "add", SWITCH)
    _ip("link", "add", "br0", "type", "bridge", ns=SWITCH)
    _ip("link", "set", "br0", "up", ns=SWITCH)
    for i in range(nodes):
        ns, dev, peer = node_ns(i), node_ifname(i), f"fcb{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", dev, "type", "veth", "peer", "name", peer)
        _ip("link", "set", dev, "netns", ns)
        _ip("link", "set", peer, "netns", SWITCH)
        _ip("link", "set", peer, "master", "br0", ns=SWITCH)
        _ip("link", "set", peer, "up", ns=SWITCH)
        _ip("addr", "add", f"{node_ip(i)}/24", "dev", dev, ns=ns)
        _ip("link", "set", dev, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _limit(ns, dev, rate)  # node -> switch
        _limit(SWITCH, peer, rate)  # switch -> node


def tx_bytes(i: int) -> int:
    """Bytes node `i` has sent on its link (the kernel's counter on the veth)."""
    stat = Path(f"/sys/class/net/{node_ifname(i)}/statistics/tx_bytes")
    out = subprocess.run(["ip", "netns", "exec", node_ns(i), "cat", str(stat)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def node_command(i: int, nodes: int, nproc: int, port: int, ds_args: list[str]) -> list[str]:
    """`ds train ...` for node `i`, run inside its namespace, rendezvous on node 0."""
    return [
        "ip", "netns", "exec", node_ns(i), "env", f"GLOO_SOCKET_IFNAME={node_ifname(i)}",
        sys.executable, "-m", "fullchain.cli", "train", *ds_args,
        "--nproc-per-node", str(nproc), "--nnodes", str(nodes), "--node-rank", str(i),
        "--rdzv-endpoint", f"{node_ip(0)}:{port}", "--local-addr", node_ip(i),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fullchain.distributed.emulated_cluster")
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="build the namespaces and limit the links")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--rate", default="100mbit")
    sub.add_parser("down", help="remove every namespace this module made")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up(args.nodes, args.rate)
            print(f"{args.nodes} nodes up at {args.rate}: " + ", ".join(
                f"{node_ns(i)} {node_ip(i)} ({node_ifname(i)})" for i in range(args.nodes)))
        else:
            down()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
