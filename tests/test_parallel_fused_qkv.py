"""A fused Q/K/V projection under tensor parallelism x FSDP2: parameters stay whole, checkpoints move between meshes.

The model is written the way GPT-2 and nanoGPT write attention (one ``c_attn = nn.Linear(d, 3*d)`` whose output is
split into q, k, v), not the way ours are, and trains on 4 real gloo ranks (`parallel_support`'s Trainer set-up)
on a ``shard 2 x tensor 2`` mesh with `FusedColwiseParallel`; this file is also the script each rank runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from parallel_support import LR, PER_RANK_BATCH, dataset, finish, load_state, start_ranks, train_config

D, HEADS, VOCAB, CLASSES, STEPS = 16, 4, 40, 3, 4


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused projection, split into q, k, v, heads, softmax, ``c_proj``."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head, self.n_embd = n_head, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        att = F.softmax(q @ k.transpose(-2, -1) / k.size(-1) ** 0.5, dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class TinyGPTClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(12, D)
        self.h = nn.ModuleList(Block(D, HEADS) for _ in range(2))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.size(1)))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x).mean(dim=1))


def build_model() -> TinyGPTClassifier:
    torch.manual_seed(0)
    return TinyGPTClassifier()


def parallelize(model: TinyGPTClassifier, tp_mesh, cfg=None, fused: bool = True) -> TinyGPTClassifier:
    """The model spec's plan; ``fused=False`` is the plain ColwiseParallel plan that mixes q, k and v."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from fullchain.distributed.tensor_parallel import FusedColwiseParallel

    plan = {"attn.c_attn": FusedColwiseParallel(parts=3) if fused else ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    for block in model.h:
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head //= tp_mesh.size()
        block.attn.n_embd //= tp_mesh.size()
    return model


def probe_ids() -> torch.Tensor:
    return dataset()[:PER_RANK_BATCH][0]


# ---- the test side -----------------------------------------------------------------------------------------


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def train_one_process(steps: int, checkpoints: Path | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process, the global batch of the 2 data-parallel ranks: what the 2 x 2 runs must end equal to."""
    from fullchain.train.checkpoint import Checkpointer
    from fullchain.train.trainer import Trainer

    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer = Checkpointer(checkpoints) if checkpoints else None
    Trainer(model, optimizer, dataset(), config=train_config(steps, PER_RANK_BATCH * 2), checkpointer=checkpointer,
            checkpoint_every=steps if checkpointer else None).fit()
    return model, optimizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fused")


@pytest.fixture(scope="module")
def reference(run_dir) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Also writes a one-process checkpoint (``ck-one``) for the 2 x 2 ranks to load."""
    return train_one_process(STEPS, run_dir / "ck-one")


@pytest.fixture(scope="module")
def hybrid_run(run_dir, reference) -> Path:
    """4 gloo ranks: train on shard 2 x tensor 2, reload its checkpoint on shard 4, resume it on replicate 2 x
    tensor 2, load ``ck-one`` on shard 2 x tensor 2, and run one batch through the fused and the plain
    ColwiseParallel plans."""
    procs = start_ranks(4, None, run_dir, script=__file__)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    return run_dir


def test_hybrid_2x2_gathers_the_state_of_one_process_trained_the_same_way(hybrid_run, reference):
    state = load_state(hybrid_run / "state.safetensors")
    assert state["h.0.attn.c_attn.weight"].shape == (3 * D, D)  # the ordinary layout, for the plain model
    assert_same_state(state, reference[0].state_dict())


def momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {name: optimizer.state[p]["momentum_buffer"] for name, p in model.named_parameters()}


def test_the_2x2_checkpoint_loads_on_4x1_and_in_one_process_optimizer_included(hybrid_run, reference):
    from fullchain.train.checkpoint import Checkpointer

    want_model, want_optimizer = reference
    assert_same_state(load_state(hybrid_run / "reloaded-fsdp.safetensors"), want_model.state_dict())

    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer = Checkpointer(hybrid_run / "ck")
    state = checkpointer.load(checkpointer.latest_valid(), model=model, optimizer=optimizer)
    assert state.trainer["step"] == STEPS
    assert_same_state(model.state_dict(), want_model.state_dict())
    assert_same_state(momentum(model, optimizer), momentum(want_model, want_optimizer))


def test_resumed_on_another_hybrid_mesh_it_ends_equal_to_an_uninterrupted_run(hybrid_run):
    want = train_one_process(2 * STEPS)[0].state_dict()
    assert_same_state(load_state(hybrid_run / "resumed.safetensors"), want)  # 2 x 2 -> replicate 2 x tensor 2


def test_a_one_process_checkpoint_loads_on_2x2_optimizer_included(hybrid_run, reference):
    got = load_state(hybrid_run / "from-one.safetensors")
    want_model, want_optimizer = reference
    want = {**want_model.state_dict(),
            **{f"momentum.{k}": v for k, v in momentum(want_model, want_optimizer).items()}}
    assert_same_state(got, want)


def test_plain_colwise_parallel_mixes_q_k_v_and_the_fused_style_does_not(hybrid_run):
    with torch.no_grad():
        want = build_model()(probe_ids())
    probes = load_state(hybrid_run / "probe.safetensors")
    torch.testing.assert_close(probes["fused"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probes["plain"], want, rtol=1e-3, atol=1e-3)


# ---- the rank side -----------------------------------------------------------------------------------------


def _strategy(mesh: dict):
    from fullchain.config import DistributedConfig
    from fullchain.distributed.fsdp import MeshStrategy

    strategy = "hybrid" if mesh.get("tensor", 1) > 1 else "fsdp"
    cfg = DistributedConfig.model_validate({"backend": "gloo", "strategy": strategy, "mesh": mesh})
    return MeshStrategy(cfg, parallelize=parallelize)


def _save_full(strategy, model: nn.Module, path: Path) -> None:
    full = strategy.full_model(model)
    if strategy.is_main:
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))


def _probe(tp_mesh, fused: bool) -> torch.Tensor:
    with torch.no_grad():
        return parallelize(build_model(), tp_mesh, fused=fused)(probe_ids())


def _resume(mesh: dict, checkpoint: Path, out: Path) -> None:
    """Resume `checkpoint` on `mesh` and train to 2 * STEPS; writes the gathered state to ``<out>.safetensors``."""
    from fullchain.train.checkpoint import Checkpointer
    from fullchain.train.trainer import Trainer

    strategy, model = _strategy(mesh), build_model()
    checkpointer = Checkpointer(out, world_size=4, rank=strategy.rank, async_save=False)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), dataset(),
                      config=train_config(2 * STEPS, PER_RANK_BATCH), strategy=strategy, checkpointer=checkpointer,
                      resume=checkpoint)
    assert trainer.fit().resumed_from_step == STEPS
    _save_full(strategy, trainer.model, out.with_suffix(".safetensors"))
    checkpointer.close()


def _load_one_process_checkpoint(directory: Path, path: Path) -> None:
    """Load a one-process checkpoint on shard 2 x tensor 2; writes the gathered weights and momentum."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from fullchain.distributed.tensor_parallel import fused_layouts, logical_state
    from fullchain.train.checkpoint import Checkpointer

    strategy = _strategy({"shard": 2, "tensor": 2})
    checkpointer = Checkpointer(directory, world_size=4, rank=strategy.rank, async_save=False)
    model = strategy.wrap(build_model())  # a bare optimiser: no scheduler, so none of the Trainer's initial_lr
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer.load(checkpointer.latest_valid(), model=model, optimizer=optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)  # whole tensors on rank 0 only
    state = strategy.full_state_dict(model)
    if strategy.is_main:
        momentum = {k: v["momentum_buffer"] for k, v in optim_state["state"].items()}
        momentum = logical_state(momentum, fused_layouts(model))
        save_file({**state, **{f"momentum.{k}": v for k, v in momentum.items()}}, str(path))
    checkpointer.close()


def main(out: Path) -> None:
    from fullchain.train.checkpoint import Checkpointer
    from fullchain.train.trainer import Trainer

    strategy = _strategy({"shard": 2, "tensor": 2})
    with torch.device("meta"):  # no rank holds the whole model; rank 0's seed weights arrive shard by shard
        model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    checkpointer = Checkpointer(out / "ck", world_size=4, rank=strategy.rank, async_save=False)
    trainer = Trainer(model, optimizer, dataset(), config=train_config(STEPS, PER_RANK_BATCH), strategy=strategy,
                      checkpointer=checkpointer, checkpoint_every=STEPS)
    strategy.materialize(trainer.model, build_model().state_dict() if strategy.is_main else None)
    trainer.fit()
    _save_full(strategy, trainer.model, out / "state.safetensors")
    fsdp = _strategy({"shard": 4})
    fresh = fsdp.wrap(build_model())
    checkpointer.load(checkpointer.latest_valid(), model=fresh)
    _save_full(fsdp, fresh, out / "reloaded-fsdp.safetensors")

    # the fused layout read back, optimiser state included: from DCP shards, and from one process's whole tensors
    _resume({"replicate": 2, "shard": 1, "tensor": 2}, checkpointer.latest_valid(), out / "resumed")
    _load_one_process_checkpoint(out / "ck-one", out / "from-one.safetensors")
    probes = {kind: _probe(strategy.mesh["tensor"], kind == "fused") for kind in ("fused", "plain")}
    if strategy.is_main:
        save_file(probes, str(out / "probe.safetensors"))
    checkpointer.close()
    strategy.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
