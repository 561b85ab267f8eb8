"""`ds train` with ``distributed.placement.enabled``: a text classifier's token table in CPU memory with sparse
gradients and SparseAdam, the rest with the run's AdamW, stepped as one optimiser by the ordinary Trainer (LR
schedule, loss scaling, clipping, checkpoints), and an artifact every later stage reads."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fullchain.artifact import load_artifact
from fullchain.config import validate_config
from fullchain.data import build_data
from fullchain.distributed.placement import PlacedOptimizer, place_for_training
from fullchain.errors import UserError
from fullchain.stages.evaluate import evaluate_artifact
from fullchain.stages.train import build_model_for, build_optimizer, train_stage
from fullchain.train.checkpoint import Checkpointer
from fullchain.train.evaluation import evaluate_model
from fullchain.train.trainer import CheckpointMismatch, Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE = "encoder.tok_emb"  # 800 x 32 fp32 = 0.1 MB: over the threshold below, so planned sparse


def run_config(runs_dir: Path, **train) -> dict:
    return {
        "name": "placed", "runs_dir": str(runs_dir), "seed": 0,
        "data": {"name": "bbc_news", "max_samples": 300, "tokenizer": {"vocab_size": 800, "max_length": 96}},
        "model": {"name": "transformer", "args": {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64}},
        # weight decay: were AdamW to hold the table, every row would shrink, looked up or not
        "train": {"max_steps": 30, "batch_size": 32, "progress": False, "tensorboard": False, "clip_norm": 1.0,
                  "optimizer": {"lr": 0.003, "weight_decay": 0.1}, **train},
        "checkpoint": {"every_steps": 15},
        "distributed": {"placement": {"enabled": True, "sparse_threshold_mb": 0.05}},
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = validate_config(run_config(tmp_path_factory.mktemp("data")))
    return build_data(cfg.data, seed=0)


def placed_trainer(bundle, tmp_path: Path, callbacks: tuple = (), **train):
    """A placed model and its Trainer, as `ds train` builds them; records what reached the table."""
    cfg = validate_config(run_config(tmp_path, **train))
    torch.manual_seed(0)
    model, _, _ = build_model_for(cfg, bundle)
    plan, optimizer, strategy = place_for_training(
        model, cfg, torch.device("cpu"), lambda params: build_optimizer(model, cfg.train.optimizer, params))
    table = model.get_submodule(TABLE)
    seen = {"ids": set(), "sparse_grads": []}

    def looked_up(module, args):
        if module.training:
            seen["ids"].update(args[0].unique().tolist())

    table.register_forward_pre_hook(looked_up)
    table.weight.register_post_accumulate_grad_hook(lambda p: seen["sparse_grads"].append(p.grad.is_sparse))
    trainer = Trainer(model, optimizer, bundle.train, bundle.val, cfg.train, task=bundle.task, strategy=strategy,
                      callbacks=list(callbacks))
    return plan, trainer, table, seen


def test_the_table_trains_sparse_with_sparseadam_and_the_model_learns(bundle, tmp_path):
    plan, trainer, table, seen = placed_trainer(bundle, tmp_path)
    optimizer = trainer.optimizer
    assert plan.sparse_names == [TABLE] and table.sparse
    assert isinstance(optimizer, PlacedOptimizer) and isinstance(optimizer.sparse, torch.optim.SparseAdam)
    in_dense = {id(p) for g in optimizer.dense.param_groups for p in g["params"]}
    assert id(table.weight) not in in_dense and optimizer.sparse.param_groups[0]["params"] == [table.weight]
    initial = table.weight.detach().clone()
    before = trainer.evaluate(bundle.train)["eval_loss"]
    result = trainer.fit()
    after = trainer.evaluate(bundle.train)["eval_loss"]

    assert result.steps == 30 and seen["sparse_grads"] == [True] * 30
    assert after < before * 0.9, (before, after)
    changed = set((table.weight != initial).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= seen["ids"]  # SparseAdam moved only looked-up rows; AdamW's decay none
    never_seen = sorted(set(range(table.num_embeddings)) - seen["ids"])
    assert never_seen and torch.equal(table.weight[never_seen], initial[never_seen])
    # the cosine schedule reached both optimisers: the table's rate decayed with the dense one
    dense_lr, sparse_lr = optimizer.dense.param_groups[0]["lr"], optimizer.sparse.param_groups[0]["lr"]
    assert sparse_lr == dense_lr == trainer.scheduler.get_last_lr()[0] < 0.003


class GradNorms:
    """The gradient norm of every step (the Trainer logs it after unscaling, before clipping)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_step_end(self, trainer, metrics):
        self.norms.append(metrics["grad_norm"])


@pytest.mark.filterwarnings("ignore:fp16 autocast on CPU")
def test_mixed_precision_steps_the_sparse_table_at_its_true_scale(bundle, tmp_path):
    """fp16's loss scaler unscales the table's sparse gradient with the rest (the norms match fp32's); bf16 needs
    no scaler. Both update the table."""
    norms = {}
    for precision in ("fp32", "fp16", "bf16"):
        recorder = GradNorms()
        _, trainer, table, seen = placed_trainer(bundle, tmp_path / precision, (recorder,), precision=precision,
                                                 max_steps=3, log_every=1)
        initial = table.weight.detach().clone()
        result = trainer.fit()
        assert math.isfinite(result.final_loss) and seen["sparse_grads"] == [True] * 3, precision
        assert not torch.equal(table.weight, initial) and torch.isfinite(table.weight).all(), precision
        norms[precision] = recorder.norms
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=1e-2)  # unscaled: not 65536x
    assert norms["bf16"] == pytest.approx(norms["fp32"], rel=0.2)



def test_placed_ds_train_resumes_exactly_and_writes_the_ordinary_artifact(bundle, tmp_path):
    cfg = validate_config(run_config(tmp_path))
    whole = train_stage(cfg)
    uninterrupted = shutil.copytree(whole.model_dir, tmp_path / "uninterrupted")
    checkpoints = cfg.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000030")  # as if stopped after the checkpoint of step 15
    shutil.rmtree(whole.model_dir)
    resumed = train_stage(cfg, resume="auto")
    assert resumed.result.resumed_from_step == 15 and resumed.result.steps == 30
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the artifact is the plain model (a dense table, no placement hooks) and predicts what the placed one did
    artifact, _ = load_artifact(resumed.model_dir)
    assert not artifact.get_submodule(TABLE).sparse
    state = Checkpointer(checkpoints).load(checkpoints / "step-000030")
    trained, _, _ = build_model_for(cfg, bundle)
    _, optimizer, _ = place_for_training(trained, cfg, torch.device("cpu"), lambda ps: torch.optim.SGD(ps, lr=0.1))
    trained.load_state_dict(state.model)
    with pytest.raises(UserError, match="saved without placement"):  # a checkpoint of the run trained unplaced
        optimizer.load_state_dict(torch.optim.SGD(trained.parameters(), lr=0.1).state_dict())
    ids = bundle.task.collate([bundle.test[i] for i in range(16)])
    inputs = bundle.task.model_inputs(ids)
    with torch.no_grad():
        assert torch.equal(artifact(*inputs), trained.eval()(*inputs))
    scored = evaluate_artifact(resumed.model_dir)  # `ds evaluate`: the test split the run file's data recipe gives
    loader = torch.utils.data.DataLoader(bundle.test, batch_size=64, collate_fn=bundle.task.collate)
    direct = evaluate_model(trained, loader, bundle.task, torch.device("cpu"))
    assert scored["n"] == direct["n"] == len(bundle.test)
    assert scored["accuracy"] == direct["eval_accuracy"] > 0.4  # five topics: chance is 0.2

    # the placed run's checkpoint resumed with placement switched off: one line, not torch's KeyError
    unplaced = validate_config({**run_config(tmp_path), "distributed": {}})
    shutil.rmtree(checkpoints / "step-000030")
    with pytest.raises(CheckpointMismatch, match=r"step-000015: its optimizer state does not fit this run's optimizer"):
        train_stage(unplaced, resume="auto")


def test_several_processes_are_refused_in_one_line_naming_the_setting(tmp_path, monkeypatch):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config(tmp_path / "runs")))
    done = subprocess.run([sys.executable, "-m", "fullchain.cli", "train", str(run), "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "distributed.placement.enabled" in done.stderr and "2 processes" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was launched or written
    # a rank torchrun started some other way refuses before it joins a process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="distributed.placement.enabled"):
        train_stage(validate_config(run_config(tmp_path / "runs")))


def test_ds_plan_says_that_ds_train_applies_the_plan(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config(tmp_path / "runs")))
    done = subprocess.run([sys.executable, "-m", "fullchain.cli", "plan", str(run)], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    assert "ds train applies this plan (distributed.placement.enabled: true)" in done.stdout
    assert TABLE in done.stdout and "sparseadam" in done.stdout
