"""Gradient-compression hooks on real gloo process groups (2 and 4 ranks, torch.multiprocessing spawn).

Each world size is launched once (module fixture); the workers run every scenario, rank 0 writes the numbers
to a JSON file and the tests assert on them, so a failure shows the measured values.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fullchain.distributed.comm.counters import CommStats, ring_allreduce_bytes
from fullchain.distributed.comm.hierarchical import build_topology, hierarchical_allreduce_
from fullchain.distributed.comm.int8 import Int8HookState, int8_allreduce_
from fullchain.distributed.comm.int8_codec import chunk_layout
from fullchain.distributed.comm.register import register_compression

DEADLINE_S = 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grad(rank: int, numel: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 7 * numel + step)
    return torch.randn(numel, generator=g) * (1.0 + rank)


def _subchunk_scale(v: torch.Tensor, world: int, cs: int) -> torch.Tensor:
    """Per element, the int8 scale (absmax / 127) of its sub-chunk in the hook's chunk layout."""
    numel = v.numel()
    length, sub, padded = chunk_layout(numel, world, cs)
    x = torch.zeros(world, padded, dtype=torch.float64)
    staged = torch.zeros(world * length, dtype=torch.float64)
    staged[:numel] = v.double()
    x[:, :length] = staged.view(world, length)
    s = x.view(world, sub, cs).abs().amax(-1, keepdim=True) / 127
    return s.expand(world, sub, cs).reshape(world, padded)[:, :length].reshape(-1)[:numel]


def _int8_bound(grads: list[torch.Tensor], out: torch.Tensor, world: int, cs: int) -> torch.Tensor:
    """Per-element bound: mean_j(s1_j) / 2 (first quantisation) + s2 / 2 (re-quantisation).

    s2 is the scale the owner used: the output's sub-chunk absmax / 127 (its largest element maps to +-127).
    """
    s1 = torch.stack([_subchunk_scale(g, world, cs) for g in grads]).mean(0)
    s2 = _subchunk_scale(out, world, cs)
    return s1 / 2 + s2 / 2


# ------------------------------------------------------------------------------------------------ scenarios
def _scenario_int8_bound(rank, world, res):
    worst = 0.0
    cases = []
    for numel in (1, 7, 1000, 3 * world * 64 + 5, 10007):
        for cs in (16, 64):
            grads = [_rank_grad(r, numel) for r in range(world)]
            exact = torch.stack([g.double() for g in grads]).mean(0)
            out = grads[rank].clone()
            int8_allreduce_(out, Int8HookState(chunk_size=cs))
            bound = _int8_bound(grads, out, world, cs)
            err = (out.double() - exact).abs()
            slack = 1e-6 * exact.abs().max().item() + 1e-7
            ratio = ((err - slack) / bound.clamp_min(1e-12)).max().item()
            worst = max(worst, ratio)
            cases.append({"numel": numel, "chunk_size": cs, "max_err": err.max().item(), "err_over_bound": ratio})
    res["int8_bound"] = {"worst_err_over_bound": worst, "cases": cases}


def _scenario_error_feedback(rank, world, res):
    numel, cs, steps = 1000, 64, 60
    grads = [_rank_grad(r, numel) for r in range(world)]
    exact = torch.stack([g.double() for g in grads]).mean(0)
    out_by_ef = {}
    for ef in (True, False):
        state = Int8HookState(chunk_size=cs, error_feedback=ef)
        total = torch.zeros(numel, dtype=torch.float64)
        errs = []
        for t in range(1, steps + 1):
            out = grads[rank].clone()
            int8_allreduce_(out, state, key="g")
            total += out.double()
            errs.append((total - t * exact).abs().max().item())
            if t == 1:
                one_step_bound = _int8_bound(grads, out, world, cs).max().item()
        out_by_ef[ef] = {"acc_err": errs, "one_step_bound": one_step_bound}
    res["error_feedback"] = {
        "ef_max_acc_err_first_half": max(out_by_ef[True]["acc_err"][: steps // 2]),
        "ef_max_acc_err_second_half": max(out_by_ef[True]["acc_err"][steps // 2 :]),
        "ef_final_acc_err": out_by_ef[True]["acc_err"][-1],
        "no_ef_final_acc_err": out_by_ef[False]["acc_err"][-1],
        "one_step_bound": out_by_ef[True]["one_step_bound"],
    }


def _scenario_state_dict(rank, world, res):
    numel, cs = 3001, 32
    a = Int8HookState(chunk_size=cs)
    for t in range(5):
        int8_allreduce_(_rank_grad(rank, numel, t), a, key="g")
    buf = io.BytesIO()
    sd = a.state_dict()
    json.dumps(sd["meta"])  # meta must be JSON-able
    torch.save(sd, buf)
    buf.seek(0)
    b = Int8HookState(chunk_size=cs)
    b.load_state_dict(torch.load(buf))
    fresh = Int8HookState(chunk_size=cs)
    out_a = int8_allreduce_(_rank_grad(rank, numel, 5), a, key="g")
    out_b = int8_allreduce_(_rank_grad(rank, numel, 5), b, key="g")
    out_fresh = int8_allreduce_(_rank_grad(rank, numel, 5), fresh, key="g")
    res["state_dict"] = {
        "restored_equal": bool(torch.equal(out_a, out_b)),
        "fresh_differs": not torch.equal(out_a, out_fresh),
        "n_tensors": len(sd["tensors"]),
    }


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )


def _train(rank, world, compression, steps, **kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    (xtr, ytr), (xte, yte) = _digits()
    model = DDP(_mlp(), bucket_cap_mb=0.02)  # ~5k floats per bucket: several buckets
    state = register_compression(model, compression, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model.module(xte).argmax(1) == yte).float().mean().item()
    return acc, state


def _scenario_ddp_training(rank, world, res):
    steps, start = 100, 10
    acc32, st32 = _train(rank, world, "none", steps)
    acc8, st8 = _train(rank, world, "int8", steps, chunk_size=256, compression_start_step=start)
    per_step32 = st32.stats.bytes_sent / steps
    per_step8 = (st8.stats.bytes_sent - st8.stats.uncompressed_bytes) / (steps - start)
    res["ddp_training"] = {
        "acc_fp32": acc32,
        "acc_int8": acc8,
        "bytes_fp32_per_step": per_step32,
        "bytes_int8_per_compressed_step": per_step8,
        "bytes_ratio": per_step8 / per_step32,
        "int8_total_bytes": st8.stats.bytes_sent,
        "int8_comm_time_s": st8.stats.comm_time_s,
        "hook_calls_per_step": st8.stats.calls / steps,
    }


def _one_step_grads(compression, **kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    (xtr, ytr), _ = _digits()
    model = DDP(_mlp(), bucket_cap_mb=0.02)
    state = register_compression(model, compression, **kwargs) if compression else None
    r = dist.get_rank()
    loss = torch.nn.functional.cross_entropy(model(xtr[r * 64 : (r + 1) * 64]), ytr[r * 64 : (r + 1) * 64])
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], state


def _scenario_bf16(rank, world, res):
    ref, _ = _one_step_grads(None)
    got, state = _one_step_grads("bf16")
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
    n_params = sum(g.numel() for g in got)
    res["bf16"] = {"max_rel_err": rel, "bytes": state.stats.bytes_sent,
                   "bf16_ring_bytes": ring_allreduce_bytes(n_params, 2, world)}


def _scenario_powersgd(rank, world, res):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_mlp(), bucket_cap_mb=0.02)
    state = register_compression(model, "powersgd", compression_start_step=2)
    x = torch.randn(16, 64)
    for _ in range(6):  # past start_powerSGD_iter=2, so the low-rank path runs with > 1 bucket
        model(x).pow(2).mean().backward()
    res["powersgd"] = {
        "ok": True,
        "hook_calls": state.stats.calls,
        "steps": state.step,
        "bytes": state.stats.bytes_sent,
    }


def _scenario_hierarchical(rank, world, res):
    topo = build_topology(procs_per_node=2)
    numel = 1001
    ints = torch.randint(-1000, 1000, (numel,), generator=torch.Generator().manual_seed(rank)).float()
    flat = ints.clone()
    dist.all_reduce(flat)
    stats = CommStats()
    hier = hierarchical_allreduce_(ints.clone(), topo, stats)
    floats = _rank_grad(rank, numel)
    flat_f = floats.clone()
    dist.all_reduce(flat_f)
    hier_f = hierarchical_allreduce_(floats.clone(), topo)
    int8_stats = CommStats()
    hier8 = hierarchical_allreduce_(floats.clone(), topo, int8_stats, Int8HookState(chunk_size=64), key="f")
    # hook inside DDP equals plain DDP after one step
    ref, _ = _one_step_grads(None)
    got, hstate = _one_step_grads("none", hierarchical=True, procs_per_node=2)
    res["hierarchical"] = {
        "int_exact": bool(torch.equal(flat, hier)),
        "float_max_rel_diff": ((flat_f - hier_f).abs() / flat_f.abs().clamp_min(1.0)).max().item(),
        "flat_bytes": ring_allreduce_bytes(numel, 4, world),
        "inter_bytes": stats.inter_node_bytes,
        "intra_bytes": stats.intra_node_bytes,
        "int8_inter_bytes": int8_stats.inter_node_bytes,
        "int8_max_rel_err": ((flat_f - hier8).abs().max() / flat_f.abs().max()).item(),
        "ddp_hook_max_diff": max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)),
        "ddp_hook_inter_bytes": hstate.stats.inter_node_bytes,
        # the inter-node all-reduce of each rank's half (its shard) of the tensor, between the 2 nodes
        "shard_ring_bytes": ring_allreduce_bytes(math.ceil(numel / 2), 4, world // 2),
        "ddp_grads_numel": sum(g.numel() for g in got),
        "ddp_hook_calls": hstate.stats.calls,
    }


SCENARIOS = {
    2: [
        _scenario_int8_bound,
        _scenario_error_feedback,
        _scenario_state_dict,
        _scenario_ddp_training,
        _scenario_bf16,
        _scenario_powersgd,
    ],
    4: [_scenario_int8_bound, _scenario_error_feedback, _scenario_hierarchical],
}


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    res = {}
    for scenario in SCENARIOS[world]:
        t0 = time.perf_counter()
        try:
            scenario(rank, world, res)
        except Exception as exc:  # report, keep the other scenarios running
            res[scenario.__name__.removeprefix("_scenario_")] = {"error": f"{type(exc).__name__}: {exc}"}
            raise
        res.setdefault("timings", {})[scenario.__name__] = time.perf_counter() - t0
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    dist.destroy_process_group()


def _run_world(world, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"w{world}") / "res.json"
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    error = None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                error = f"{world}-rank workers did not finish in {DEADLINE_S} s (hang)"
                break
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    res = json.loads(out.read_text()) if out.exists() else {}
    res["_error"] = error
    return res


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run_world(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run_world(4, tmp_path_factory)


def _get(res, name):
    assert name in res, f"scenario {name} did not report: {res.get('_error')}"
    assert "error" not in res[name], res[name]
    return res[name]


@pytest.mark.parametrize("world", [2, 4])
def test_int8_mean_within_quantisation_bound(world, world2, world4):
    r = _get({2: world2, 4: world4}[world], "int8_bound")
    assert r["worst_err_over_bound"] <= 1.0, r


@pytest.mark.parametrize("world", [2, 4])
def test_error_feedback_keeps_accumulated_error_bounded(world, world2, world4):
    r = _get({2: world2, 4: world4}[world], "error_feedback")
    # sum of outputs = steps * mean - (mean worker residual) - (owner residual): within ~one step's bound
    assert r["ef_final_acc_err"] <= 1.5 * r["one_step_bound"], r
    assert r["ef_max_acc_err_second_half"] <= 1.5 * r["ef_max_acc_err_first_half"] + 1e-6, r
    assert r["no_ef_final_acc_err"] > 5 * r["ef_final_acc_err"], r  # without feedback the bias accumulates


def test_state_dict_round_trip_restores_residuals(world2):
    r = _get(world2, "state_dict")
    assert r["n_tensors"] == 2
    assert r["restored_equal"], r
    assert r["fresh_differs"], r


def test_ddp_int8_trains_like_fp32_with_quarter_bytes(world2):
    r = _get(world2, "ddp_training")
    assert r["acc_fp32"] > 0.9, r
    assert r["acc_int8"] >= r["acc_fp32"] - 0.02, r  # stated tolerance: 2 accuracy points
    assert 0.24 <= r["bytes_ratio"] <= 0.27, r
    assert r["hook_calls_per_step"] > 1, r  # several buckets


def test_bf16_hook_on_gloo(world2):
    r = _get(world2, "bf16")
    assert r["max_rel_err"] < 2**-7, r
    assert r["bytes"] == r["bf16_ring_bytes"], r  # counted from the tensors sent: 2 bytes an element


def test_powersgd_on_gloo_multi_bucket_does_not_hang(world2):
    r = _get(world2, "powersgd")
    assert r["ok"] and r["steps"] == 6 and r["hook_calls"] > 6, r  # > 1 bucket per step, no hang


def test_hierarchical_equals_flat(world4):
    r = _get(world4, "hierarchical")
    assert r["int_exact"], r
    assert r["float_max_rel_diff"] <= 1e-6, r
    # across nodes a rank sends only its shard's ring all-reduce (2 nodes): 1/3 of what flat sends in all
    assert r["inter_bytes"] == r["shard_ring_bytes"] < r["flat_bytes"] / 2, r
    assert r["int8_inter_bytes"] < 0.3 * r["inter_bytes"] + 64, r
    assert r["int8_max_rel_err"] < 0.02, r
    assert r["ddp_hook_max_diff"] <= 1e-6, r
    half = 4 * r["ddp_grads_numel"] / 2  # each bucket's shard: half of it, rounded up
    assert half <= r["ddp_hook_inter_bytes"] <= half + 4 * r["ddp_hook_calls"], r


def test_register_rejects_unknown_name():
    from fullchain.errors import UserError

    with pytest.raises(UserError):
        register_compression(None, "int4")  # type: ignore[arg-type]


def test_layout_is_consistent():
    for numel in (1, 5, 1000, 4097):
        for world in (2, 3, 4):
            length, sub, padded = chunk_layout(numel, world, 64)
            assert length * world >= numel and padded >= length and padded == sub * 64
            assert math.ceil(length / 64) == sub
