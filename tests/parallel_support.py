"""Real multi-process runs for the parallel tests: `run_ranks` starts N gloo ranks of this file as a script.

Every rank trains the same tiny Transformer classifier on the same synthetic token data with the Trainer and a
Checkpointer, under the strategy the scenario names, and rank 0 writes the gathered full state dict as
safetensors, which the test compares with a single-process reference (`reference_state`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = {"vocab_size": 40, "num_classes": 3, "d_model": 16, "n_heads": 4, "n_layers": 2, "d_ff": 32,
              "max_length": 12, "dropout": 0.0}
PER_RANK_BATCH = 4
LR = 0.05


def dataset(n: int = 96) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, MODEL_ARGS["vocab_size"], (n, 10), generator=g)
    labels = (ids[:, 0] % 3).long()
    return torch.utils.data.TensorDataset(ids, labels)


def build_model() -> torch.nn.Module:
    from fullchain.models.transformer import TransformerClassifier

    torch.manual_seed(0)
    return TransformerClassifier(**MODEL_ARGS)


def train_config(steps: int, batch_size: int) -> dict:
    return {"max_steps": steps, "batch_size": batch_size, "progress": False, "tensorboard": False,
            "log_every": 1, "device": "cpu", "optimizer": {"name": "sgd", "lr": LR},
            "schedule": {"kind": "constant"}}


def reference_state(steps: int, data_parallel: int) -> dict[str, torch.Tensor]:
    """One process, the global batch of `data_parallel` ranks: what every strategy must end equal to."""
    from fullchain.train.trainer import Trainer

    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    Trainer(model, optimizer, dataset(), config=train_config(steps, PER_RANK_BATCH * data_parallel)).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(n: int, scenario: dict | None, out: Path, script: str = __file__) -> list[subprocess.Popen]:
    """`n` gloo ranks of `script` (this file by default) with `out` as their argument; `scenario` goes to
    ``out/scenario.json``."""
    out.mkdir(parents=True, exist_ok=True)
    if scenario is not None:
        (out / "scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, script, str(out)], cwd=REPO,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def run_ranks(n: int, scenario: dict, out: Path) -> dict:
    """Run `scenario` on `n` ranks to the end; returns rank 0's results (asserting every rank exited 0)."""
    procs = start_ranks(n, scenario, out)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0] * n, "\n".join(outputs)
    return json.loads((out / "result.json").read_text())


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---- the rank side ---------------------------------------------------------------------------------------


class _Pace:
    """A Trainer callback that sleeps after each step, so a test can kill the ranks mid-run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer, metrics) -> None:
        time.sleep(self.seconds)


def _strategy(spec: dict):
    from fullchain.config import DistributedConfig
    from fullchain.distributed.ddp import DDPStrategy
    from fullchain.distributed.fsdp import MeshStrategy
    from fullchain.models.encoder import parallelize_encoder_model

    cfg = DistributedConfig.model_validate({"backend": "gloo", "strategy": spec["strategy"],
                                            "mesh": spec.get("mesh", {}), "balance": spec.get("balance", {}),
                                            **spec.get("comm", {})})
    if cfg.strategy == "ddp":
        return DDPStrategy(cfg)
    return MeshStrategy(cfg, parallelize=parallelize_encoder_model)


def slow_down(model: torch.nn.Module, seconds_per_sample: float) -> None:
    """A deterministic straggler: the forward sleeps in proportion to the samples it processes."""
    model.register_forward_pre_hook(lambda _, args: time.sleep(seconds_per_sample * len(args[0])))


def _replica_comm(strategy) -> dict | None:
    """Bytes the compressed all-reduce across HSDP replicas sent: in all, and in its fp32 warm-up steps."""
    replicas = getattr(strategy, "replicas", None)
    if replicas is None:
        return None
    return {"bytes": replicas.state.stats.bytes_sent, "fp32_bytes": replicas.state.stats.uncompressed_bytes,
            "steps": replicas.state.step}


def _train(out: Path, spec: dict) -> dict:
    from fullchain.train.checkpoint import Checkpointer
    from fullchain.train.trainer import Trainer

    strategy = _strategy(spec)
    on_meta = spec.get("meta") and not strategy.is_main  # as `ds train` does: only rank 0 builds the whole model
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_model()
        if spec.get("meta"):  # a buffer no state dict carries: it must come from rank 0 too
            model.register_buffer("scale", torch.full((3,), 2.0), persistent=False)
    seed_state = model.state_dict() if spec.get("meta") and strategy.is_main else None
    if spec.get("delay"):  # rank r is (r + 1) times slower per sample
        slow_down(model, spec["delay"] * (strategy.rank + 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer = Checkpointer(out / "ck", world_size=strategy.world_size, rank=strategy.rank, async_save=False)
    trainer = Trainer(model, optimizer, dataset(), config=train_config(spec["steps"], PER_RANK_BATCH),
                      strategy=strategy, checkpointer=checkpointer, checkpoint_every=spec.get("every", 2),
                      run_dir=out if spec.get("balance") else None,  # metrics.jsonl for `ds logs analyze`
                      resume="auto" if spec.get("resume") else None, callbacks=[_Pace(spec.get("pace", 0.0))])
    if spec.get("meta"):
        strategy.materialize(trainer.model, seed_state)
        (out / f"buffer-rank{strategy.rank}.json").write_text(json.dumps(trainer.model.scale.tolist()))
    result = trainer.fit()
    full = strategy.full_model(trainer.model)
    if strategy.is_main:
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(out / "state.safetensors"))
    outcome = {"resumed_from": result.resumed_from_step, "steps": result.steps, "wall_s": result.wall_s,
               "sizes": getattr(trainer.split, "sizes", None), "replica_comm": _replica_comm(strategy),
               "data_rank": strategy.data_rank, "data_world_size": strategy.data_world_size}
    reload = spec.get("reload_on")
    if reload:  # the final checkpoint, loaded into a fresh model on another mesh of the same ranks
        other = _strategy({"strategy": "fsdp", "mesh": reload})
        fresh = other.wrap(build_model())
        checkpointer.load(checkpointer.latest_valid(), model=fresh)
        full = other.full_model(fresh)
        if other.is_main:
            save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(out / "reloaded.safetensors"))
    checkpointer.close()
    strategy.close()
    return outcome


def main(out: Path) -> None:
    spec = json.loads((out / "scenario.json").read_text())
    outcome = _train(out, spec)
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
