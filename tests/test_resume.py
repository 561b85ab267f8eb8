"""Resume is bit-exact: stopped mid-epoch (with accumulation and dropout) and resumed equals uninterrupted.

Real data (scikit-learn digits), real signals, real processes: a SIGTERM'd `ds train`, and a 2-rank torchrun
group with one worker SIGKILLed that finishes by itself. `ds train --resume auto` over checkpoints that cannot
be read, are corrupt or hold unlisted files: skipped and moved aside, or refused before training, never lost.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fullchain.config import DataConfig
from fullchain.data import build_data
from fullchain.models import build_model, model_args_from_data
from fullchain.train.callbacks import Callback
from fullchain.train.checkpoint import Checkpointer
from fullchain.train.trainer import CheckpointMismatch, Trainer
from resume_support import signal_env

DS_TRAIN = [sys.executable, "-m", "fullchain.cli", "train"]
CONFIG = {"max_steps": 40, "batch_size": 16, "grad_accum": 3, "clip_norm": 1.0, "progress": False,
          "tensorboard": False, "schedule": {"warmup_steps": 5}}


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", val_fraction=0.0, test_fraction=0.2), seed=0)


def fresh_trainer(bundle, run_dir, config=CONFIG, **kw):
    torch.manual_seed(0)
    args = model_args_from_data("mlp", bundle.input_spec, {"hidden": [64, 32], "dropout": 0.2})
    model = build_model(name="mlp", args=args)
    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=2)
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), bundle.train, config=config,
                   run_dir=run_dir, seed=0, checkpointer=ckpt, checkpoint_every=10, **kw), model


class SignalAt(Callback):
    """Sends this process a real SIGTERM at a given step, as a scheduler would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_then_resume_is_bit_exact(digits, tmp_path):
    reference, ref_model = fresh_trainer(digits, tmp_path / "a")
    reference.fit()
    reference.checkpointer.close()

    # 1257 train samples / 16 = 79 micro-batches = 27 steps an epoch: step 13 is mid-epoch, 40 crosses epochs.
    stopped, _ = fresh_trainer(digits, tmp_path / "b", callbacks=[SignalAt(13)])
    result = stopped.fit()
    stopped.checkpointer.close()
    assert result.stopped_by == "SIGTERM" and result.steps == 13
    assert (tmp_path / "b" / "checkpoints" / "step-000013" / "meta.json").is_file()

    resumed, model = fresh_trainer(digits, tmp_path / "b", resume="auto")
    result = resumed.fit()
    assert result.resumed_from_step == 13 and result.steps == 40
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    events = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "steps_lost": 0, "restart_count": 0}.items() <= next(
        e for e in events if e.get("event") == "resume").items()


def test_resume_refuses_a_different_batch_layout(digits, tmp_path):
    first, _ = fresh_trainer(digits, tmp_path, config={**CONFIG, "max_steps": 10})
    first.fit()
    first.checkpointer.close()
    second, _ = fresh_trainer(digits, tmp_path, config={**CONFIG, "grad_accum": 2}, resume="auto")
    with pytest.raises(CheckpointMismatch, match="grad_accum 3"):
        second.fit()


def run_file(tmp_path: Path, checkpoint: dict | None = None, hidden: list[int] = (256, 256), signalled: bool = False,
             **train) -> Path:
    """A digits MLP run file; `signalled`: the same MLP as `resume_support.SignalledMLP` (see `signal_env`)."""
    model = {"target": "resume_support:SignalledMLP"} if signalled else {"name": "mlp"}
    raw = {"name": "r", "runs_dir": str(tmp_path / "runs"), "seed": 0,
           "model": {**model, "args": {"hidden": list(hidden), "dropout": 0.0}},
           "data": {"name": "digits", "val_fraction": 0.0},
           "train": {"batch_size": 16, "progress": False, "tensorboard": False, "log_every": 5, **train},
           "checkpoint": checkpoint or {"every_steps": 200, "keep_last": 3}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ds_train(run: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ds train RUN ARGS` to its end, with tests/ importable (for resume_support) and `env` added."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([*DS_TRAIN, run, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})})


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before the fault was injected"
        if metrics.is_file():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def reference_and_run_file(tmp_path: Path, *launch: str, hidden: list[int], **checkpoint) -> tuple[Path, Path, Path]:
    """Runs a/ to its end (100 steps, a checkpoint every 20) and writes b/'s identical run file; returns
    a's and b's run directories and b's run file."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(run_file(tmp_path / name, {"every_steps": 20, "keep_last": 3, **checkpoint}, hidden,
                             signalled=True, max_steps=100))
    ref = ds_train(runs[0], *launch)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return tmp_path / "a" / "runs" / "r", tmp_path / "b" / "runs" / "r", runs[1]


def assert_same_weights(a: Path, b: Path, stderr: str) -> None:
    ref, got = final_weights(a), final_weights(b)
    assert all(torch.equal(ref[k], got[k]) for k in ref), divergence(a, b, stderr)


def divergence(a: Path, b: Path, stderr: str) -> str:
    """Where an interrupted run's logged losses part from the uninterrupted one's (to diagnose a failure)."""
    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}

    first, second = losses(a), losses(b)
    parted = [step for step in sorted(first) if step in second and first[step] != second[step]]
    return (f"losses part at step {parted[:1]} (of {len(parted)} differing rows); stderr: "
            + " | ".join(line for line in stderr.splitlines() if "step" in line or "resum" in line)[-1500:])


def test_sigterm_to_ds_train_saves_exits_143_and_resumes(tmp_path):
    """SIGTERM during step 50's forward pass (mid-epoch, 10 steps after a checkpoint): the step finishes and is
    saved, exit 143; `--resume auto` goes on from step 50 across an epoch end (90 steps) and ends bit-exact."""
    a, b, run = reference_and_run_file(tmp_path, hidden=[64])
    stopped = ds_train(run, env=signal_env(50))
    err = stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at step 50" in err and "--resume auto" in err and "Traceback" not in err

    resumed = ds_train(run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert [e["step"] for e in resume_events(b)] == [50]
    assert_same_weights(a, b, err + resumed.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_torchrun_worker_sigkill_restarts_and_matches_uninterrupted(tmp_path, compression):
    """Rank 1 SIGKILLed during step 30, 10 steps after a checkpoint: torchrun restarts the group, which resumes
    from step 20 and ends bit-exact. int8 (compressing from step 10): the hook's error-feedback residuals must
    come back from the checkpoint, and apply on the first step after the restart (DDP's pre-rebuild bucket
    layout), for the result to be bit-exact. Saves are synchronous here, so step 20's is committed before the
    kill however slow the machine (an async one still in flight would make the group start over from 0)."""
    launch = ["--nproc-per-node", "2", "--max-restarts", "3", "--set", f"distributed.compression={compression}"]
    a, b, run = reference_and_run_file(tmp_path, *launch, hidden=[256, 256], async_save=False)
    done = ds_train(run, *launch, env=signal_env(30, "SIGKILL", rank=1))
    assert done.returncode == 0, done.stderr[-3000:]
    (resume,) = resume_events(b)
    assert resume["restart_count"] == 1 and resume["step"] == 20, resume
    assert_same_weights(a, b, done.stderr)


# ---- checkpoints that cannot be trusted ----------------------------------------------------------


def small_run(root: Path, **train) -> Path:
    """A small digits MLP, 40 steps, a checkpoint every 10 steps, all four kept."""
    return run_file(root, checkpoint={"every_steps": 10, "keep_last": 4}, hidden=[32], max_steps=40, **train)


@pytest.fixture(scope="module")
def four_checkpoints(tmp_path_factory) -> Path:
    """checkpoints/ of a finished 40-step run: step-000010 ... step-000040."""
    root = tmp_path_factory.mktemp("base")
    done = subprocess.run([*DS_TRAIN, small_run(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root / "runs" / "r" / "checkpoints"


@pytest.fixture
def checkpoints(four_checkpoints, tmp_path) -> Path:
    """A copy of the four checkpoints in this test's run directory (no metrics, no model yet)."""
    return Path(shutil.copytree(four_checkpoints, tmp_path / "runs" / "r" / "checkpoints"))


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def set_aside(checkpoints: Path, step: int) -> list[Path]:
    return sorted(checkpoints.glob(f"corrupt-step-{step:06d}-*"))


def permissions_apply() -> list[str]:
    """A command prefix under which chmod 000 really denies reading: none for a user; for root (whom file modes
    do not stop), setpriv dropping the capabilities that bypass them, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): chmod 000 cannot deny root a read")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def resume_events(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "resume"]


@pytest.mark.parametrize(("how", "reason"), [
    ("unreadable directory", r"cannot read \S*step-000040/meta.json \(Permission denied\)"),
    ("unreadable file", r"cannot read model.safetensors \(Permission denied\)"),
    ("unlisted file", r"files not listed in meta.json: trainer.safetensors"),
])
def test_a_checkpoint_that_cannot_be_trusted_is_skipped_moved_aside_and_kept(checkpoints, tmp_path, how, reason):
    newest = checkpoints / "step-000040"
    original = tree_bytes(newest)
    prefix = []
    if how == "unlisted file":  # trainer.safetensors, not in meta.json, would be loaded unverified
        (newest / "trainer.safetensors").write_bytes((newest / "model.safetensors").read_bytes())
        original = tree_bytes(newest)
    else:
        prefix = permissions_apply()
        (newest if how == "unreadable directory" else newest / "model.safetensors").chmod(0)
    done = subprocess.run([*prefix, *DS_TRAIN, small_run(tmp_path), "--resume", "auto"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(rf"checkpoint \S*step-000040 does not verify \({reason}\); moved aside to \S*corrupt-step-000040-",
                     done.stderr), done.stderr
    assert "Traceback" not in done.stderr and f"resuming from {checkpoints / 'step-000030'}" in done.stderr
    assert [e["step"] for e in resume_events(tmp_path / "runs" / "r")] == [30]
    (moved,) = set_aside(checkpoints, 40)
    for path in (moved, *moved.iterdir()):
        path.chmod(0o755)
    assert tree_bytes(moved) == original  # kept as it was, for whoever looks into it
    assert Checkpointer(checkpoints).verify(newest) == []  # the resumed run wrote its own step 40


def corrupt_all(checkpoints: Path) -> None:
    flip_a_byte(checkpoints / "step-000010" / "model.safetensors")
    (checkpoints / "step-000020" / "meta.json").unlink()
    (checkpoints / "step-000030" / "optimizer.safetensors").write_bytes(b"")
    (checkpoints / "step-000040" / "extra.bin").write_bytes(b"not listed")


def test_none_valid_refuses_before_training_then_allow_fresh_starts_over_keeping_them(checkpoints, tmp_path):
    corrupt_all(checkpoints)
    everything = tree_bytes(checkpoints)
    each = {step: tree_bytes(checkpoints / f"step-{step:06d}") for step in (10, 20, 30, 40)}
    run, run_dir = small_run(tmp_path), tmp_path / "runs" / "r"

    refused = subprocess.run([*DS_TRAIN, run, "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr
    assert "Traceback" not in message and "--resume auto --allow-fresh" in message
    reasons = {10: "checksum mismatch for model.safetensors", 20: "missing meta.json",
               30: "size mismatch for optimizer.safetensors", 40: "files not listed in meta.json: extra.bin"}
    for step, reason in reasons.items():
        assert re.search(rf"step-0000{step} \({reason}", message), message
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "model").exists()  # no training at all
    assert tree_bytes(checkpoints) == everything and sorted(p.name for p in checkpoints.iterdir()) == [
        ".writer.lock", "step-000010", "step-000020", "step-000030", "step-000040"]

    fresh = subprocess.run([*DS_TRAIN, run, "--resume", "auto", "--allow-fresh"], capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert f"no valid checkpoint in {checkpoints}: training from step 0" in fresh.stderr
    assert resume_events(run_dir) == [] and (run_dir / "model" / "model.safetensors").is_file()
    assert {step: [tree_bytes(p) for p in set_aside(checkpoints, step)] for step in each} == {
        step: [files] for step, files in each.items()}  # moved aside, byte for byte
    ckpt = Checkpointer(checkpoints)
    assert [ckpt.verify(checkpoints / f"step-{step:06d}") for step in (10, 20, 30, 40)] == [[]] * 4


def test_allow_fresh_goes_with_resume_auto(tmp_path):
    done = subprocess.run([*DS_TRAIN, small_run(tmp_path), "--allow-fresh"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--allow-fresh goes with --resume auto" in done.stderr


def test_resume_auto_without_checkpoints_starts_from_0_and_says_so_before_training(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*DS_TRAIN, run_file(tmp_path, hidden=[32], max_steps=100_000), "--resume", "auto"],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for_step(run_dir / "metrics.jsonl", 1, proc)  # training is under way
            said = (tmp_path / "stderr.txt").read_text()
        finally:
            proc.kill()
            proc.wait(30)
    assert f"no valid checkpoint in {run_dir / 'checkpoints'}: training from step 0" in said, said
    assert resume_events(run_dir) == []
