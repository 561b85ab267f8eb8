"""The Trainer on real data (scikit-learn digits): accumulation maths, precision, determinism, logging."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from fullchain.config import DataConfig
from fullchain.data import build_data
from fullchain.models import build_model, model_args_from_data
from fullchain.train.callbacks import Callback
from fullchain.train.trainer import Trainer


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", val_fraction=0.1, test_fraction=0.2), seed=0)


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


def test_accumulation_skips_gradient_sync_on_all_but_the_last_micro_batch(digits):
    calls = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

        def no_sync(self):
            calls.append("no_sync")
            import contextlib

            return contextlib.nullcontext()

    model = FakeDDP(mlp(digits))
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), digits.train,
                config=quiet(max_steps=3, grad_accum=4, batch_size=8))
    t.fit()
    assert calls == ["no_sync"] * 9  # 3 of every 4 micro-batches defer the sync


def test_bf16_training_lowers_the_loss(digits):
    model = mlp(digits)
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), digits.train, digits.val,
                config=quiet(epochs=4, batch_size=32, precision="bf16"))
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
