"""The Trainer on real data (scikit-learn digits): accumulation maths (also under real 2-rank DDP), precision,
determinism, logging."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

from fullchain.config import DataConfig, DistributedConfig
from fullchain.data import build_data
from fullchain.distributed.ddp import DDPStrategy
from fullchain.models import build_model, model_args_from_data
from fullchain.train.callbacks import Callback
from fullchain.train.trainer import Trainer


def digits_bundle():
    return build_data(DataConfig(name="digits", val_fraction=0.1, test_fraction=0.2), seed=0)


@pytest.fixture(scope="module")
def digits():
    return digits_bundle()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp(bundle, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    args = model_args_from_data("mlp", bundle.input_spec, {"hidden": [64], "dropout": dropout})
    return build_model(name="mlp", args=args)


def quiet(**kw):
    return {"progress": False, "tensorboard": False, **kw}


def test_grad_accumulation_equals_one_large_batch(digits):
    """k micro-batches (the last one short) give the same update as one batch of their total size."""
    data = Subset(digits.train, range(30 * 4))
    big, small = mlp(digits), mlp(digits)
    small.load_state_dict(big.state_dict())
    a = Trainer(big, torch.optim.SGD(big.parameters(), lr=0.1), DataLoader(data, batch_size=30),
                config=quiet(max_steps=4, schedule={"kind": "constant"}))
    # 30 samples per step as micro-batches of 8, 8, 8 and 6: unequal sizes test the loss weighting.
    b = Trainer(small, torch.optim.SGD(small.parameters(), lr=0.1),
                DataLoader(data, batch_sampler=[list(range(s + o, s + o + n)) for s in range(0, 120, 30)
                                                for o, n in ((0, 8), (8, 8), (16, 8), (24, 6))]),
                config=quiet(max_steps=4, grad_accum=4, schedule={"kind": "constant"}))
    a.fit()
    b.fit()
    for (name, p), q in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def counting_allreduce(calls: list[int], bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's all-reduce (mean), counted. Synchronous, so no Python callback rides on a gloo future."""
    calls.append(bucket.index())
    grads = bucket.buffer()
    dist.all_reduce(grads)
    done = torch.futures.Future()
    done.set_result(grads.div_(dist.get_world_size()))
    return done


def ddp_rank(rank: int, port: int, out: str, steps: int, grad_accum: int) -> None:
    """One of two real DDP ranks (gloo): micro-batches of 16, `grad_accum` of them a step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    strategy = DDPStrategy(DistributedConfig())
    data = digits_bundle()
    model = mlp(data)
    calls: list[int] = []
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data.train, strategy=strategy,
                config=quiet(max_steps=steps, batch_size=16, grad_accum=grad_accum, schedule={"kind": "constant"}))
    t.model.register_comm_hook(calls, counting_allreduce)
    t.fit()
    if rank == 0:
        save_file(model.state_dict(), f"{out}/weights.safetensors")
        Path(out, "allreduces.json").write_text(json.dumps(len(calls)))
    strategy.close()


def test_ddp_with_accumulation_equals_one_process_on_the_global_batch(digits, tmp_path):
    """2 DDP ranks x 3 micro-batches of 16 a step = one process with 3 micro-batches of 32; the gradients are
    all-reduced once a step (the first two micro-batches of each step run under no_sync)."""
    steps, grad_accum = 4, 3
    mp.start_processes(ddp_rank, args=(free_port(), str(tmp_path), steps, grad_accum), nprocs=2,
                       start_method="spawn")
    single = mlp(digits)
    Trainer(single, torch.optim.SGD(single.parameters(), lr=0.1), digits.train,
            config=quiet(max_steps=steps, batch_size=32, grad_accum=grad_accum, schedule={"kind": "constant"})).fit()
    ddp = load_file(tmp_path / "weights.safetensors")
    for name, p in single.state_dict().items():
        assert not torch.equal(p, mlp(digits).state_dict()[name]), f"{name} did not train"
        torch.testing.assert_close(ddp[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "allreduces.json").read_text()) == steps  # one bucket, once a step


def test_bf16_training_lowers_the_loss(digits):
    model = mlp(digits)
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), digits.train, digits.val,
                config=quiet(max_steps=60, batch_size=32, precision="bf16"))
    before = t.evaluate()["eval_loss"]
    result = t.fit()
    after = t.evaluate()["eval_loss"]
    assert after < 0.5 * before
    assert t.last_eval["eval_accuracy"] > 0.85
    assert result.skipped_steps == 0


def test_same_seed_gives_bit_identical_weights(digits):
    def train():
        model = mlp(digits, dropout=0.2)
        Trainer(model, torch.optim.AdamW(model.parameters()), digits.train,
                config=quiet(max_steps=20, batch_size=16, clip_norm=1.0), seed=3).fit()
        return model.state_dict()

    first, second = train(), train()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fp16_scaler_skips_overflowing_steps_and_counts_them(digits):
    class Overflowing(type(digits.task)):  # a task whose loss overflows fp16's range
        def loss(self, outputs, batch):
            loss_sum, n = super().loss(outputs, batch)
            return loss_sum * 1e30, n

    model = mlp(digits)
    task = Overflowing(digits.label_names, 1, 8, 8)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), digits.train, task=task,
                config=quiet(max_steps=2, batch_size=16, precision="fp16"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = t.fit()
    assert result.skipped_steps == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_every_epoch_ends_with_an_evaluation_the_last_one_too(digits, grad_accum):
    """`epochs: 2` without eval_every: an evaluation after each epoch, also after the last step of the last."""
    ends = []

    class Recorder(Callback):
        def on_epoch_end(self, trainer, epoch):
            ends.append(("epoch", epoch))

        def on_eval_end(self, trainer, metrics):
            ends.append(("eval", trainer.step))

    model = mlp(digits)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), Subset(digits.train, range(200)), digits.val,
                config=quiet(epochs=2, batch_size=32, grad_accum=grad_accum), callbacks=[Recorder()])
    result = t.fit()
    per_epoch = t.steps_per_epoch
    assert ends == [("epoch", 1), ("eval", per_epoch), ("epoch", 2), ("eval", 2 * per_epoch)]
    assert result.last_eval["epoch"] == 2


def test_metrics_jsonl_callbacks_and_schedule(digits, tmp_path):
    events = []

    class Recorder(Callback):
        def on_train_start(self, trainer):
            events.append("start")

        def on_eval_end(self, trainer, metrics):
            events.append("eval")

        def on_train_end(self, trainer, result):
            events.append("end")

    model = mlp(digits)
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), digits.train, digits.val,
                config={"max_steps": 30, "batch_size": 32, "log_every": 5, "eval_every": 10, "progress": False,
                        "schedule": {"warmup_steps": 5}},
                run_dir=tmp_path, callbacks=[Recorder()])
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert train_rows[0]["learning_rate"] == pytest.approx(1e-2)  # warm-up over: factor 1 at step 5
    assert train_rows[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches zero at the end
    assert all(r["train_samples_per_second"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [10, 20, 30]
    assert events == ["start", "eval", "eval", "eval", "end"]
    assert any((tmp_path / "tensorboard").iterdir())
