"""The emulated cluster: 2 network-namespace nodes x 2 ranks behind a rate-limited link, a real 4-rank run.

Needs root, iproute2 and network namespaces; elsewhere the run test skips and says which is missing.
"""

import json
import subprocess

import pytest
import yaml

from fullchain.distributed import emulated_cluster as cluster

REASON = cluster.available()


@pytest.fixture
def two_nodes():
    cluster.up(2, "200mbit")
    yield
    cluster.down()


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=f"emulated cluster: {REASON}")
def test_four_ranks_on_two_nodes_train_and_the_link_carries_the_gradients(tmp_path, two_nodes):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "name": "emu", "runs_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": "mlp", "args": {"hidden": [256, 256], "dropout": 0.0}},
        "data": {"name": "digits", "val_fraction": 0.1},
        "train": {"max_steps": 20, "batch_size": 32, "progress": False, "tensorboard": False, "log_every": 5},
        "checkpoint": {"enabled": False},
        "distributed": {"compression": "int8", "compression_start_step": 2},
    }))
    before = cluster.tx_bytes(0)
    nodes = [subprocess.Popen(cluster.node_command(i, 2, 2, 29471, [str(run)]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    errors = [node.communicate(timeout=240)[1] for node in nodes]
    assert nodes[1].returncode == 0, errors[1][-2000:]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "emu" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "comm_bytes_total" in r][-1]
    assert last["step"] == 20 and any("eval_accuracy" in r for r in rows)
    # Node 0's two ranks reach node 1 only through the limited veth. Of what one rank's hook counts (2 fp32
    # steps, then int8), node 0 puts about 1.2x on the wire: 2 of each rank's 3 all-to-all messages, and one
    # rank's all-gather ring hop and all-reduce ring hop, plus TCP headers and the start-up weight broadcast.
    # Had the hook sent fp32 while counting int8, the link would carry about 3.5x the count.
    crossed = cluster.tx_bytes(0) - before
    print(f"\nnode 0 sent {crossed} bytes; rank 0's hook counted {last['comm_bytes_total']}")
    assert 0.5 * last["comm_bytes_total"] <= crossed <= 2.0 * last["comm_bytes_total"]


def test_up_without_root_says_why(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(cluster.UserError, match="needs root"):
        cluster.up(2, "100mbit")


def test_node_command_runs_ds_train_inside_the_namespace_with_its_own_address():
    cmd = cluster.node_command(1, nodes=2, nproc=2, port=29400, ds_args=["run.yaml"])
    assert cmd[:4] == ["ip", "netns", "exec", "fc-node1"]
    assert "GLOO_SOCKET_IFNAME=fcv1" in cmd
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "10.77.0.1:29400"
    assert cmd[cmd.index("--local-addr") + 1] == "10.77.0.2"
