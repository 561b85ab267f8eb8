"""`ds bench parallel`: DDP vs FSDP2 vs hybrid, the placement planner, and static vs balanced data parallelism.

(a) step time, per-rank parameter memory (weights + optimiser state the rank holds between steps, against
    the 1/N ideal) and peak RSS of DDP, FSDP2, hybrid (tensor 2 x shard 2) and HSDP (replicate 2 x shard 2,
    with an fp32 or an int8 all-reduce across replicas: bytes sent across replicas) on 4 gloo ranks,
    Transformer classifier; (b) a recommendation-style model with a large sparse embedding table: the
    planner's placement (table on the CPU with SparseAdam, sparse gradients) against everything dense with
    AdamW on one device;
    (c) 2 ranks, rank 1 slowed 2x by a delay proportional to its samples: static split against the balanced
    split (`distributed.balance`) under DDP and under FSDP2, with the final accuracy of both (equal gradients
    give equal training).
Checks: the full state gathered from FSDP2 (2 ranks) and hybrid (2 x 2) equals one process trained the same way.
`--quick` runs the checks and (c) only, on a tiny model.

Ranks are real processes started by torchrun (`python -m fullchain.bench.parallel WORKDIR` is the worker).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fullchain import metric_names as M
from fullchain.bench.harness import BenchRecord
from fullchain.distributed.comm.counters import ring_allreduce_bytes
from fullchain.errors import UserError

TINY = {"vocab_size": 64, "num_classes": 4, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
        "max_length": 16, "dropout": 0.0}
LARGE = {"vocab_size": 8000, "num_classes": 4, "d_model": 256, "n_heads": 8, "n_layers": 4, "d_ff": 1024,
         "max_length": 64, "dropout": 0.0}
LR = 0.05


class Recommender(nn.Module):
    """A recommendation-style classifier: ``id_columns`` categorical ids looked up in one big table (summed per
    row, an EmbeddingBag), concatenated with the dense features, then an MLP."""

    def __init__(self, num_features: int, num_classes: int, rows: int = 1_000_000, dim: int = 32,
                 id_columns: int = 4, sparse: bool = True):
        super().__init__()
        self.id_columns = id_columns
        self.table = nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(dim + num_features - id_columns, 256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, dense = x[:, : self.id_columns].long(), x[:, self.id_columns:]
        return self.mlp(torch.cat([self.table(ids), dense], dim=1))


def token_data(args: dict, n: int = 512, length: int = 12) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, args["vocab_size"], (n, min(length, args["max_length"])), generator=g)
    return torch.utils.data.TensorDataset(ids, ids[:, 0] % args["num_classes"])


def make_model(args: dict) -> nn.Module:
    from fullchain.models.transformer import TransformerClassifier

    torch.manual_seed(0)
    return TransformerClassifier(**args)


def train_config(steps: int, batch_size: int) -> dict:
    return {"max_steps": steps, "batch_size": batch_size, "progress": False, "tensorboard": False,
            "log_every": steps, "device": "cpu", "schedule": {"kind": "constant"}}


def reference_state(args: dict, steps: int, global_batch: int) -> dict[str, torch.Tensor]:
    """One process, the global batch: what every strategy's gathered state must equal."""
    from fullchain.train.trainer import Trainer

    model = make_model(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    Trainer(model, optimizer, token_data(args), config=train_config(steps, global_batch)).fit()
    return model.state_dict()


def states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


# ---- launching ranks ------------------------------------------------------------------------------------


def run_ranks(workdir: Path, nproc: int, scenario: dict) -> dict:
    """Run `scenario` on `nproc` local gloo ranks under torchrun; returns rank 0's result."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scenario.json").write_text(json.dumps(scenario))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fullchain.bench.parallel", str(workdir)]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise UserError(f"parallel bench: scenario {scenario['name']} failed: {done.stderr.strip()[-800:]}")
    result = json.loads((workdir / "result.json").read_text())
    result["ranks"] = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]
    return result


# ---- the rank side --------------------------------------------------------------------------------------


class StepClock:
    """Trainer callback: the wall time of every step."""

    def __init__(self):
        self.times: list[float] = []
        self._last = time.perf_counter()

    def on_step_end(self, trainer, metrics) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights and optimiser state this rank holds between steps (its shards only; gradients are
    freed after each step)."""
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    total = sum(size(p) for p in model.parameters())
    return total + sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def _worker(workdir: Path) -> None:
    from fullchain.config import DistributedConfig
    from fullchain.distributed.ddp import DDPStrategy
    from fullchain.distributed.fsdp import MeshStrategy
    from fullchain.models.encoder import parallelize_encoder_model
    from fullchain.train.trainer import Trainer

    spec = json.loads((workdir / "scenario.json").read_text())
    cfg = DistributedConfig.model_validate({"backend": "gloo", **spec["distributed"]})
    strategy = DDPStrategy(cfg) if cfg.strategy == "ddp" else MeshStrategy(cfg, parallelize_encoder_model)
    model = make_model(spec["model"])
    if spec.get("delay"):  # rank r is (r + 1) times slower per sample
        seconds = spec["delay"] * (strategy.rank + 1)
        model.register_forward_pre_hook(lambda _, args: time.sleep(seconds * len(args[0])))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    clock = StepClock()
    trainer = Trainer(model, optimizer, token_data(spec["model"]), config=train_config(spec["steps"], spec["batch"]),
                      strategy=strategy, callbacks=[clock])
    trainer.fit()
    # a file per rank, not all_gather_object: a gloo work holding Python objects can deadlock the exit
    (workdir / f"rank{strategy.rank}.json").write_text(json.dumps({
        "bytes": local_bytes(trainer.model, trainer.optimizer),
        "replica_bytes": strategy.metrics(trainer.step).get(M.COMM_INTER_NODE_BYTES_TOTAL),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    full = strategy.full_model(trainer.model)
    if strategy.is_main:
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(workdir / "state.safetensors"))
        (workdir / "result.json").write_text(json.dumps({
            "step_times": clock.times, "sizes": getattr(trainer.split, "sizes", None)}))
    strategy.close()


# ---- the contenders -------------------------------------------------------------------------------------


def _median_step(result: dict, skip: int) -> float:
    return statistics.median(result["step_times"][skip:])


def equality_checks(root: Path, args: dict, steps: int = 4, per_rank: int = 4) -> dict[str, bool]:
    want = reference_state(args, steps, 2 * per_rank)
    checks = {}
    for name, nproc, distributed in (("fsdp", 2, {"strategy": "fsdp"}),
                                     ("hybrid", 4, {"strategy": "hybrid", "mesh": {"tensor": 2}})):
        run_ranks(root / name, nproc, {"name": name, "distributed": distributed, "model": args, "steps": steps,
                                       "batch": per_rank})
        checks[f"{name}_state_equal"] = states_equal(load_file(str(root / name / "state.safetensors")), want)
    return checks


def accuracy(args: dict, state: dict[str, torch.Tensor]) -> float:
    model = make_model(args)
    model.load_state_dict(state)
    ids, labels = token_data(args).tensors
    with torch.no_grad():
        return float((model.eval()(ids).argmax(1) == labels).float().mean())


def balance_contenders(root: Path, args: dict, steps: int, delay: float,
                       strategy: str = "ddp") -> tuple[dict, float, bool]:
    """Static vs balanced split under `strategy` with rank 1 slowed 2x: the results, the balanced / static
    step-time ratio and whether both trained the same model."""
    results, states = {}, {}
    for name, balance in (("static", {"enabled": False}), ("balanced", {"enabled": True, "every_steps": 2})):
        distributed = {"strategy": strategy, "balance": balance}
        r = run_ranks(root / strategy / name, 2, {"name": name, "distributed": distributed, "model": args,
                                                  "steps": steps, "batch": 8, "delay": delay})
        states[name] = load_file(str(root / strategy / name / "state.safetensors"))
        skip = steps // 2  # after warm-up and the first re-balancing
        results[name] = {"step_s": _median_step(r, skip), "final_accuracy": accuracy(args, states[name]),
                         "split": r["sizes"] or [8, 8]}
    ratio = results["balanced"]["step_s"] / results["static"]["step_s"]
    return results, ratio, states_equal(states["balanced"], states["static"])


def strategy_contenders(root: Path, args: dict, steps: int) -> dict:
    results = {}
    full_bytes = sum(p.numel() for p in make_model(args).parameters()) * 4 * 2  # weights and SGD momentum
    hsdp = {"strategy": "fsdp", "mesh": {"replicate": 2, "shard": 2}}
    for name, distributed in (("ddp", {"strategy": "ddp"}), ("fsdp", {"strategy": "fsdp"}),
                              ("hybrid", {"strategy": "hybrid", "mesh": {"tensor": 2}}), ("hsdp", hsdp),
                              ("hsdp_int8", {**hsdp, "compression": "int8", "compression_start_step": 0})):
        r = run_ranks(root / name, 4, {"name": name, "distributed": distributed, "model": args, "steps": steps,
                                       "batch": 4})
        per_rank = [rank["bytes"] for rank in r["ranks"]]
        results[name] = {"step_s": _median_step(r, 2), "param_bytes_per_rank_max": max(per_rank),
                         "ideal_bytes_per_rank": full_bytes / 4, "vs_ideal": max(per_rank) / (full_bytes / 4),
                         "peak_rss_mb_max": max(rank["peak_rss_mb"] for rank in r["ranks"]),
                         "final_accuracy": accuracy(args, load_file(str(root / name / "state.safetensors")))}
        if name == "hsdp_int8":  # bytes each rank sent across replicas, against the fp32 ring all-reduce of its shard
            shard_numel = sum(p.numel() for p in make_model(args).parameters()) // 2
            results[name]["replica_bytes_per_step"] = r["ranks"][0]["replica_bytes"] / steps
            results[name]["fp32_replica_bytes_per_step"] = ring_allreduce_bytes(shard_numel, 4, 2)
    return results


def sparse_contenders(rows: int, steps: int) -> dict:
    """The planner's placement against everything dense on one device (both on this machine's device)."""
    from fullchain.distributed.placement import MB, place, placed_optimizer, plan_placement

    features, batch = 12, 256
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (steps, batch, 4), generator=g).float()
    x = torch.cat([ids, torch.randn(steps, batch, features - 4, generator=g)], dim=2)
    y = torch.randint(0, 2, (steps, batch), generator=g)
    results = {}
    for name in ("one_device_dense", "planned"):
        torch.manual_seed(0)
        model = Recommender(features, 2, rows=rows, sparse=False)
        plan = plan_placement(model, "cuda", sparse_threshold_mb=16)
        if name == "planned":
            place(model, plan, "cpu")  # this machine's device stands in for the accelerator
            optimizer = placed_optimizer(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-3), lr=1e-3)
            accel = plan.bytes_on("cuda")
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            accel = sum(p.numel() * p.element_size() for p in model.parameters()) * 4  # w + g + 2 moments
        times = []
        for i in range(steps):
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        results[name] = {"step_s": statistics.median(times[2:]), "accelerator_mb": accel / MB,
                         "final_loss": loss.item()}
    return results


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    steps, delay = (12, 0.02) if quick else (20, 0.02)
    with tempfile.TemporaryDirectory(prefix="fullchain-parallel-bench-") as tmp:
        root = Path(tmp)
        checks = equality_checks(root / "equal", TINY)
        results, ratios = {}, {}
        for strategy, suffix in (("ddp", ""), ("fsdp", "_fsdp")):
            balance, ratio, same_model = balance_contenders(root / "balance", TINY, steps, delay, strategy)
            results.update({f"balance{suffix}_{k}": v for k, v in balance.items()})
            ratios[f"balanced_vs_static_step_time{suffix}"] = ratio
            checks[f"balanced_same_model{suffix}"] = same_model  # equal gradients every step: the same weights
        if not quick:
            strategies = strategy_contenders(root / "strategies", LARGE, 8)
            results.update({f"strategy_{k}": v for k, v in strategies.items()})
            int8, fp32 = strategies["hsdp_int8"], strategies["hsdp"]
            ratios["hsdp_int8_vs_fp32_replica_bytes"] = (int8["replica_bytes_per_step"]
                                                         / int8["fp32_replica_bytes_per_step"])
            ratios["hsdp_int8_vs_fp32_step_time"] = int8["step_s"] / fp32["step_s"]
            sparse = sparse_contenders(2_000_000, 12)
            results.update({f"sparse_{k}": v for k, v in sparse.items()})
            ratios["planned_vs_dense_step_time"] = sparse["planned"]["step_s"] / sparse["one_device_dense"]["step_s"]
    return BenchRecord(
        bench="parallel",
        settings={"quick": quick, "backend": "gloo", "model": TINY if quick else {"balance": TINY, "strategies": LARGE},
                  "balance": {"ranks": 2, "global_batch": 16, "steps": steps, "delay_s_per_sample": delay,
                              "slow_rank": "rank 1, 2x rank 0's per-sample delay", "every_steps": 2,
                              "strategies": ["ddp", "fsdp (FSDP2 over 2 ranks)"]},
                  "optimizer": "SGD momentum 0.9"},
        results=results, ratios=ratios, checks=checks,
        notes=["step times are medians after warm-up on a shared CPU machine (gloo); under load"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
