"""The emulated cluster's guard rails (the 4-rank run inside it is still being stabilised: see issue 4)."""

import pytest

from fullchain.distributed import emulated_cluster as cluster


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
