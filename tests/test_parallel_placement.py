"""The placement planner: big sparse tables on the CPU with SparseAdam, dense layers on the accelerator; `ds plan`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fullchain.bench.parallel import Recommender
from fullchain.distributed.placement import MB, place, placed_optimizer, plan_placement

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_big_sparse_table_goes_to_the_cpu_and_the_plan_says_why():
    with torch.device("meta"):  # a million-row table, planned without allocating it
        model = Recommender(num_features=12, num_classes=2, rows=1_000_000, dim=32)
    plan = plan_placement(model, "cuda", budget_bytes=64 * MB, sparse_threshold_mb=64)
    table, dense = plan.groups
    assert (table.name, table.device, table.optimizer) == ("table", "cpu", "sparseadam")
    assert "sparse=True" in table.reason
    assert table.bytes == 1_000_000 * 32 * 4 * 3  # weights + SparseAdam's two moments
    assert dense.device == "cuda" and dense.kind == "dense" and "mlp" in dense.name
    assert plan.fits  # the dense part fits 64 MB; the whole model would not
    assert any("everything on it would not" in note for note in plan.notes)


def test_a_dense_table_over_the_threshold_is_planned_sparse_and_a_small_one_stays():
    model = nn.Sequential(nn.Embedding(5000, 64), nn.Linear(64, 2))  # 1.2 MB, not built sparse
    assert plan_placement(model, sparse_threshold_mb=1).sparse_names == ["0"]
    assert "1.2 MB >= sparse_threshold_mb 1" in plan_placement(model, sparse_threshold_mb=1).groups[0].reason
    assert plan_placement(model, sparse_threshold_mb=2).sparse_names == []


def test_placed_training_steps_only_the_looked_up_rows_and_learns():
    torch.manual_seed(0)
    model = Recommender(num_features=8, num_classes=2, rows=10_000, dim=8, sparse=False)
    plan = plan_placement(model, sparse_threshold_mb=0.1)
    place(model, plan, "cpu")
    optimizer = placed_optimizer(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-2), lr=1e-2)
    assert isinstance(optimizer.sparse, torch.optim.SparseAdam)
    ids = torch.randint(0, 50, (64, 4)).float()  # only rows 0..49 are ever looked up
    x, y = torch.cat([ids, torch.randn(64, 4)], dim=1), (ids[:, 0] % 2).long()
    untouched = model.table.weight[50:].detach().clone()
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert model.table.weight.grad.is_sparse
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
    assert torch.equal(model.table.weight[50:], untouched)


def test_ds_plan_prints_each_group_with_device_memory_and_reason(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 1000, (60, 4)), rng.normal(size=(60, 8))], axis=1).astype(np.float32)
    np.savez(tmp_path / "clicks.npz", x=x, y=rng.integers(0, 2, 60))
    run = tmp_path / "run.yaml"
    run.write_text(
        "name: rec\n"
        f"data: {{name: npz, path: {tmp_path / 'clicks.npz'}}}\n"
        "model: {target: 'fullchain.bench.parallel:Recommender', args: {rows: 2000000, dim: 32}}\n"
        "distributed: {placement: {accelerator_memory_gb: 0.5}}\n")
    done = subprocess.run([sys.executable, "-m", "fullchain.cli", "plan", str(run), "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={"COLUMNS": "200",
                                                                                            "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    assert "table" in done.stdout and "sparse=True" in done.stdout and "cuda" in done.stdout
    assert "ds train does not apply this plan (distributed.placement.enabled: false)" in done.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["fits"] and plan["bytes"]["cpu"] == 2_000_000 * 32 * 4 * 3
    assert [g["device"] for g in plan["groups"]] == ["cpu", "cuda"]
    assert plan["applied_by_train"] is False


def test_ds_plan_names_a_bad_field_in_one_line(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("name: rec\ndata: {name: digits}\nmodel: {name: mlp}\n"
                   "distributed: {placement: {accelerator_memory_gb: -1}}\n")
    done = subprocess.run([sys.executable, "-m", "fullchain.cli", "plan", str(run)], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "distributed.placement.accelerator_memory_gb" in done.stderr


def test_placing_moves_only_the_dense_part_and_the_table_never_visits_the_device():
    """The meta device stands in for a GPU: a table that went there and back would have lost its values."""
    torch.manual_seed(0)
    model = Recommender(num_features=8, num_classes=2, rows=10_000, dim=8, sparse=False)
    table, rows = model.table, model.table.weight.detach().clone()
    place(model, plan_placement(model, sparse_threshold_mb=0.1), "meta")
    assert model.table is table and table.sparse  # back in its slot
    assert table.weight.device.type == "cpu" and torch.equal(table.weight, rows)
    assert {p.device.type for p in model.mlp.parameters()} == {"meta"}


def test_a_table_tied_to_the_output_head_stays_dense_and_the_plan_says_why():
    from fullchain.models import build_model

    with torch.device("meta"):  # a language model whose vocabulary head shares the token table's weight
        model = build_model(name="causal_lm", args={"vocab_size": 5000, "d_model": 64, "n_heads": 2, "n_layers": 1,
                                                    "d_ff": 64, "max_length": 32})
    plan = plan_placement(model, sparse_threshold_mb=0.5)
    assert plan.sparse_names == [] and [g.device for g in plan.groups] == ["cuda"]
    assert "encoder.tok_emb stays dense" in plan.notes[0] and "lm_head.weight" in plan.notes[0]
