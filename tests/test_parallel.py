"""FSDP2 and hybrid (tensor parallel x FSDP2) on gloo ranks: parameters stay whole, checkpoints move between meshes.

Real processes (2 and 4 gloo ranks started by `parallel_support`), a real SIGKILL, real DCP checkpoints.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from fullchain.config import validate_config
from fullchain.distributed.balance import split
from fullchain.distributed.mesh import MeshShape, resolve_shape
from fullchain.errors import UserError
from fullchain.train.checkpoint import Checkpointer
from parallel_support import LR, build_model, finish, load_state, reference_state, run_ranks, start_ranks

BASE = {"name": "x", "model": {"name": "transformer"}, "data": {"name": "bbc_news"}}


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def reference_4_steps() -> dict[str, torch.Tensor]:
    return reference_state(steps=4, data_parallel=2)


def test_fsdp_built_on_meta_gathered_state_equals_one_process(tmp_path, reference_4_steps):
    result = run_ranks(2, {"strategy": "fsdp", "mesh": {"shard": 2}, "steps": 4, "meta": True}, tmp_path)
    assert (result["data_rank"], result["data_world_size"]) == (0, 2)
    assert_same_state(load_state(tmp_path / "state.safetensors"), reference_4_steps)
    for rank in range(2):  # a non-persistent buffer, in no state dict, is rank 0's on every rank
        assert json.loads((tmp_path / f"buffer-rank{rank}.json").read_text()) == [2.0, 2.0, 2.0]


def committed_steps(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in directory.glob("step-*")
                  if not p.name.endswith(".tmp") and (p / "meta.json").exists())


@pytest.mark.slow
def test_hybrid_2x2_killed_resumes_equal_and_loads_on_4x1_and_one_process(tmp_path):
    scenario = {"strategy": "hybrid", "mesh": {"shard": 2, "tensor": 2}, "steps": 8, "every": 2}
    procs = start_ranks(4, {**scenario, "pace": 0.25}, tmp_path)
    deadline = time.monotonic() + 120
    while not committed_steps(tmp_path / "ck") or committed_steps(tmp_path / "ck")[-1] < 4:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs, 10)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 4
    killed_at = committed_steps(tmp_path / "ck")[-1]
    assert killed_at < 8

    result = run_ranks(4, {**scenario, "resume": True, "reload_on": {"shard": 4}}, tmp_path)
    assert result["resumed_from"] >= killed_at and result["steps"] == 8
    want = reference_state(steps=8, data_parallel=2)  # hybrid 2 x 2 reads 2 data slices per step
    assert_same_state(load_state(tmp_path / "state.safetensors"), want)
    assert_same_state(load_state(tmp_path / "reloaded.safetensors"), want)  # the 2 x 2 checkpoint on 4 x 1

    model = build_model()  # ... and in one process, optimiser state included
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer = Checkpointer(tmp_path / "ck")
    state = checkpointer.load(checkpointer.latest_valid(), model=model, optimizer=optimizer)
    assert state.trainer["step"] == 8 and len(optimizer.state) == len(list(model.parameters()))
    assert_same_state(model.state_dict(), want)


def test_hsdp_compresses_the_all_reduce_across_replicas_with_int8(tmp_path):
    # replicate 2 x shard 2: FSDP2 reduce-scatters inside each replica in fp32, int8 carries the shards across
    scenario = {"strategy": "fsdp", "mesh": {"replicate": 2, "shard": 2}, "steps": 6, "every": 3,
                "comm": {"compression": "int8", "compression_start_step": 2, "chunk_size": 64}}
    result = run_ranks(4, scenario, tmp_path / "whole")
    comm = result["replica_comm"]
    fp32_per_step = comm["fp32_bytes"] / 2
    int8_per_step = (comm["bytes"] - comm["fp32_bytes"]) / 4
    assert comm["steps"] == 6 and 0 < int8_per_step < 0.35 * fp32_per_step  # ~1/4 of fp32, scales included
    print(f"across replicas: int8 {int8_per_step:.0f} B/step, fp32 {fp32_per_step:.0f} B/step per rank")
    got, want = load_state(tmp_path / "whole" / "state.safetensors"), reference_state(steps=6, data_parallel=4)
    # int8 with error feedback: close to the exact run, and not equal to it (the wire really was 8-bit)
    assert set(got) == set(want)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=2e-3) for k in want)
    assert any(not torch.equal(got[k], want[k]) for k in want)

    # resumed from the checkpoint of step 3: every rank's residuals and the step count come back, bit for bit
    shutil.copytree(tmp_path / "whole" / "ck", tmp_path / "split" / "ck",
                    ignore=lambda _, names: [n for n in names if n.startswith("step-000006")])
    assert run_ranks(4, {**scenario, "resume": True}, tmp_path / "split")["resumed_from"] == 3
    resumed = load_state(tmp_path / "split" / "state.safetensors")
    assert all(torch.equal(resumed[k], got[k]) for k in got)


@pytest.mark.parametrize(("mesh", "world", "shape"), [
    ({}, 4, MeshShape(1, 4, 1)),
    ({"tensor": 2}, 4, MeshShape(1, 2, 2)),
    ({"replicate": 2}, 4, MeshShape(2, 2, 1)),
    ({"replicate": 2, "shard": 1, "tensor": 2}, 4, MeshShape(2, 1, 2)),
])
def test_unset_mesh_dimensions_fill_the_world(mesh, world, shape):
    assert resolve_shape(mesh.get("replicate"), mesh.get("shard"), mesh.get("tensor"), world) == shape


@pytest.mark.parametrize(("mesh", "world", "message"), [
    ({"shard": 2, "tensor": 2}, 2, "does not divide the world size 2"),
    ({"replicate": 2, "shard": 2, "tensor": 1}, 8, "= 4 ranks, but 8 processes were launched"),
])
def test_a_mesh_that_does_not_fit_the_world_is_one_line(mesh, world, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_shape(mesh.get("replicate"), mesh.get("shard"), mesh.get("tensor"), world)
    assert "\n" not in str(err.value) and str(err.value).startswith("distributed.mesh:")


@pytest.mark.parametrize(("distributed", "message"), [
    ({"strategy": "fsdp", "mesh": {"tensor": 2}}, "mesh.tensor: 2 needs strategy hybrid"),
    ({"strategy": "hybrid"}, "strategy hybrid needs tensor >= 2"),
    ({"strategy": "ddp", "mesh": {"shard": 2}}, "mesh.shard: 2 needs strategy fsdp or hybrid"),
    ({"strategy": "fsdp", "compression": "int8"}, "compression: int8 with strategy fsdp compresses the all-reduce "
                                                   "across replicas .HSDP.; set mesh.replicate >= 2"),
    ({"strategy": "fsdp", "mesh": {"replicate": 2}, "compression": "powersgd"}, "compression: powersgd needs whole"),
    ({"strategy": "hybrid", "mesh": {"tensor": 2}, "hierarchical": True}, "hierarchical: strategy hybrid with "
                                                                          "mesh.replicate > 1 .HSDP. is hierarchical"),
    ({"strategy": "zero3"}, "distributed.strategy: 'zero3' is not one of ddp, fsdp, hybrid"),
    ({"strategy": "hybrid", "mesh": {"tensor": 2}, "balance": {"enabled": True}}, "balance.enabled: load balancing "
                                                                                   "needs strategy ddp or fsdp"),
])
def test_distributed_settings_that_cannot_work_are_one_line_errors(distributed, message):
    with pytest.raises(UserError, match=message) as err:
        validate_config({**BASE, "distributed": distributed}, "run.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("run.yaml: distributed")


@pytest.mark.parametrize("strategy", [{"strategy": "ddp"}, {"strategy": "fsdp", "mesh": {"shard": 2}}])
def test_balancing_gives_a_slow_rank_less_work_and_keeps_the_uniform_gradient(tmp_path, strategy):
    # rank 1 takes twice as long per sample as rank 0 (a sleep proportional to its samples)
    scenario = {**strategy, "steps": 6, "every": 100, "delay": 0.004, "balance": {"enabled": True, "every_steps": 1}}
    result = run_ranks(2, scenario, tmp_path)
    assert sum(result["sizes"]) == 8 and result["sizes"][0] > result["sizes"][1]
    # every step's gradient is the whole global batch's, as in one process: the end state is the same
    assert_same_state(load_state(tmp_path / "state.safetensors"), reference_state(steps=6, data_parallel=2))
    print(f"balanced split {result['sizes']}, {result['wall_s']:.2f} s for 6 steps (CPU shared, not asserted)")
    # the run's log carries the split, and `ds logs analyze` names the slow rank from it
    from fullchain.monitor.logs import analyze_run

    findings = {f.rule: f for f in analyze_run(tmp_path).findings}
    assert findings["train_straggler"].title == "Rank 1 is a straggler"


@pytest.mark.parametrize(("total", "weights", "min_share", "sizes"), [
    (8, [1.0, 1.0], 0.0, [4, 4]),
    (8, [2.0, 1.0], 0.0, [5, 3]),
    (9, [1.0, 1.0, 1.0], 0.0, [3, 3, 3]),
    (10, [100.0, 1.0], 0.2, [8, 2]),  # never below min_share of the global batch
    (3, [1.0, 0.0, 0.0], 0.0, [1, 1, 1]),  # every rank keeps a sample
])
def test_split_is_proportional_and_sums_to_the_global_batch(total, weights, min_share, sizes):
    assert split(total, weights, min_share) == sizes


def test_the_monitor_names_a_straggler_from_the_balanced_split():
    from fullchain.monitor.rules import diagnose

    findings = {f.rule: f for f in diagnose({"rank_batch_samples": [11.0, 5.0]})}
    assert findings["train_straggler"].title == "Rank 1 is a straggler"
    assert "2.2x slower" in findings["train_straggler"].action
    assert "train_straggler" not in {f.rule for f in diagnose({"rank_batch_samples": [9.0, 8.0]})}


def test_a_run_not_launched_by_torchrun_trains_in_one_process_whatever_its_strategy(monkeypatch):
    from fullchain.distributed.select import make_strategy
    from fullchain.distributed.strategy import LocalStrategy

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = validate_config({**BASE, "train": {"device": "cpu"},
                           "distributed": {"strategy": "hybrid", "mesh": {"tensor": 2}}})
    strategy = make_strategy(cfg)
    assert type(strategy) is LocalStrategy and (strategy.data_rank, strategy.data_world_size) == (0, 1)


def test_ds_train_under_fsdp_writes_the_ordinary_artifact_that_ds_evaluate_reads(tmp_path):
    """The whole chain: `ds train --nproc-per-node 2` with strategy fsdp gathers the shards into one plain model."""
    import subprocess
    import sys

    run_file = tmp_path / "fsdp.yaml"
    run_file.write_text(
        "name: fsdp\nseed: 0\n"
        "data: {name: bbc_news, max_samples: 200, tokenizer: {vocab_size: 600, max_length: 48}}\n"
        "model: {name: transformer, args: {d_model: 32, n_heads: 4, n_layers: 1, d_ff: 64}}\n"
        "train: {epochs: 1, batch_size: 16}\n"
        "distributed: {strategy: fsdp}\n")
    ds = [sys.executable, "-m", "fullchain.cli"]
    trained = subprocess.run([*ds, "train", str(run_file), "--nproc-per-node", "2"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=240)
    assert trained.returncode == 0, trained.stderr[-3000:]
    model_dir = tmp_path / "runs" / "fsdp" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors", "tokenizer.json"]
    evaluated = subprocess.run([*ds, "evaluate", str(model_dir)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout, evaluated.stderr[-2000:]
