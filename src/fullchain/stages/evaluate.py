"""`ds evaluate`: rebuild a model artifact without pickle and score it on held-out or user data.

By default the artifact's own recipe (data config + seed in model.json, tokenizer.json beside it) rebuilds
exactly the split the model was trained against, so the figures match the end of training. ``--data``
scores a different set instead: a built-in name or a user file (csv, jsonl, npz, image folder); its labels
are mapped onto the model's label names by name. Every variant is scored through the runtime `ds serve` would
use for it (`fullchain.artifact.load`): an int8 artifact through its int8 program, never the float weights it
also carries; an exported ``model.onnx`` through ONNX Runtime, with the model.json found beside it. Latency
figures are timed the same way: batch-1 calls of real examples through that runtime. `prepare` and
`predicted_labels` give `ds ab` the same examples and runtimes, per example.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fullchain.artifact import LoadedModel, load
from fullchain.config import DataConfig
from fullchain.data import DataBundle, build_data
from fullchain.errors import UserError
from fullchain.optimize.measure import latency_samples, median_p99_ms
from fullchain.tasks import LABELS
from fullchain.train.evaluation import evaluate_model

USER_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".npz": "npz"}
SPLITS = ("train", "val", "test", "all")


class _RuntimeAsModule(torch.nn.Module):
    """A serving runtime (torch module, ONNX Runtime session, compiled int8 program) seen as a module."""

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runtime(*inputs))


class _RelabelledDataset(Dataset):
    """Maps a dataset's label indices onto the model's label indices (by label name)."""

    def __init__(self, data: Dataset, mapping: list[int]):
        self.data, self.mapping = data, mapping

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = dict(self.data[i])
        sample[LABELS] = torch.tensor(self.mapping[int(sample[LABELS])])
        return sample


def data_config_for(data: str, recorded: dict[str, Any]) -> tuple[DataConfig, str]:
    """A DataConfig for `--data` (name or path) that keeps the recorded tokenizer/image settings."""
    base = {k: v for k, v in recorded.items() if k in ("text_column", "label_column", "tokenizer", "image_size")}
    path = Path(data)
    if path.exists():
        name = "image_folder" if path.is_dir() else USER_FORMATS.get(path.suffix.lower())
        if name is None:
            raise UserError(f"--data {data}: unknown file type {path.suffix!r} (use .csv, .jsonl, .npz or a folder)")
        return DataConfig(name=name, path=str(path), val_fraction=0.0, **base), "all"
    try:
        return DataConfig(name=data, **base), "test"
    except ValueError:
        raise UserError(f"--data {data!r}: neither an existing file nor a known dataset name") from None


def select_split(bundle: DataBundle, split: str) -> Dataset:
    if split == "all":
        return ConcatDataset([d for d in (bundle.train, bundle.val, bundle.test) if d is not None])
    chosen = getattr(bundle, split)
    if chosen is None:
        raise UserError(f"--split {split}: this dataset has no {split} split")
    return chosen


def text_baselines(bundle: DataBundle) -> dict[str, dict[str, Any]]:
    """TF-IDF + logistic regression on the bundle's own split: the baseline a text classifier has to beat.

    Fitted on the train texts; its n-grams and regularisation are the best of a small grid on the validation
    split (the configuration a careful user would pick, chosen without seeing the test split); scored on the
    test texts. Empty for data that is not raw text."""
    train, val, test = bundle.train, bundle.val, bundle.test
    if getattr(train, "texts", None) is None or getattr(test, "texts", None) is None:
        return {}
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    def fitted(ngrams: tuple[int, int], c: float):
        pipeline = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=ngrams, min_df=2),
                                 LogisticRegression(C=c, max_iter=2000))
        return pipeline.fit(train.texts, train.targets.numpy())

    grid = [(ngrams, c) for ngrams in ((1, 1), (1, 2)) for c in (1.0, 10.0, 100.0)]
    if val is not None and getattr(val, "texts", None):
        ngrams, c = max(grid, key=lambda g: fitted(*g).score(val.texts, val.targets.numpy()))
    else:
        ngrams, c = (1, 1), 10.0
    predicted = fitted(ngrams, c).predict(test.texts)
    truth = test.targets.numpy()
    return {"tfidf_logreg": {"accuracy": float(accuracy_score(truth, predicted)),
                             "macro_f1": float(f1_score(truth, predicted, average="macro")),
                             "ngram_range": list(ngrams), "C": c}}


@dataclass
class Prepared:
    """An artifact loaded with the runtime it serves with, and the examples it is scored on."""

    loaded: LoadedModel
    dataset: Dataset
    split: str

    def loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=False, collate_fn=self.loaded.task.collate)


def prepare(
    model_path: str | Path,
    data: str | None = None,
    split: str | None = None,
    bundle: DataBundle | None = None,
    trust_code: bool = False,
) -> Prepared:
    """Load the artifact at `model_path` and the examples `ds evaluate` scores it on (its own recipe's test split,
    or `data`), with the labels mapped onto the model's label indices."""
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    loaded = load(model_path, threads=torch.get_num_threads(), trust_code=trust_code)
    meta = loaded.meta
    if bundle is None:
        if meta.data is None and data is None:
            raise UserError(f"{model_path}: model.json records no training data; pass --data")
        recorded = meta.data["config"] if meta.data else {}
        seed = meta.data["seed"] if meta.data else 0
        if data is None:
            cfg, default_split = DataConfig.model_validate(recorded), "test"
        else:
            cfg, default_split = data_config_for(data, recorded)
        split = split or default_split
        bundle = build_data(cfg, seed=seed, encoding=loaded.encoder)
    split = split or "test"
    if bundle.kind != meta.input.get("kind"):
        raise UserError(f"--data: {bundle.kind} data, but the model reads {meta.input.get('kind')} data")
    dataset = select_split(bundle, split)
    if meta.label_names and bundle.label_names != meta.label_names:
        unknown = sorted(set(bundle.label_names) - set(meta.label_names))
        if unknown:
            raise UserError(f"--data: labels {unknown} are not among the model's labels {meta.label_names}")
        dataset = _RelabelledDataset(dataset, [meta.label_names.index(n) for n in bundle.label_names])
    return Prepared(loaded, dataset, split)


def runtime_latencies(prepared: Prepared, samples: int, warmup: int = 5) -> list[float]:
    """Seconds of single-example calls (batch 1, the real-time case) through the serving runtime, cycling over the
    first `samples` examples of the evaluated data."""
    task, runtime = prepared.loaded.task, prepared.loaded.runtime
    examples = [task.model_inputs(task.collate([prepared.dataset[i]]))
                for i in range(min(samples, len(prepared.dataset)))]
    calls = itertools.cycle(examples)
    return latency_samples(lambda: runtime(*next(calls)), repeats=samples, warmup=warmup)


def latency_figures(seconds: list[float]) -> dict[str, float]:
    p50, p99 = median_p99_ms(seconds)
    return {"latency_p50_ms": p50, "latency_p99_ms": p99}


def predicted_labels(prepared: Prepared, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(true label index, predicted label index) of every example, in the model's label order."""
    task, runtime = prepared.loaded.task, prepared.loaded.runtime
    truth, predicted = [], []
    for batch in prepared.loader(batch_size):
        truth.append(batch[LABELS].numpy())
        predicted.append(runtime(*task.model_inputs(batch)).argmax(-1))
    return np.concatenate(truth), np.concatenate(predicted)


def evaluate_artifact(
    model_path: str | Path,
    data: str | None = None,
    split: str | None = None,
    batch_size: int = 64,
    bundle: DataBundle | None = None,
    trust_code: bool = False,
    latency_calls: int = 0,
) -> dict[str, Any]:
    """Score an artifact (a directory, or an exported ``.onnx`` with model.json beside it) through the runtime it
    serves with; returns accuracy, macro_f1, loss, n, the confusion matrix and label names (perplexity and token
    accuracy for a language model); with `latency_calls`, also the median and p99 of that many batch-1 calls
    (``latency_p50_ms``, ``latency_p99_ms``).

    `trust_code`: the artifact's builder may be user code it names (see `fullchain.models.targets`)."""
    prepared = prepare(model_path, data, split, bundle, trust_code)
    meta, task = prepared.loaded.meta, prepared.loaded.task
    metrics = evaluate_model(_RuntimeAsModule(prepared.loaded.runtime), prepared.loader(batch_size), task,
                             torch.device("cpu"))
    result = {"split": prepared.split, "n": metrics["n"], "loss": metrics["eval_loss"]}
    if "eval_accuracy" in metrics:
        result.update(
            accuracy=metrics["eval_accuracy"],
            macro_f1=metrics["eval_macro_f1"],
            confusion_matrix=metrics["confusion_matrix"],
            label_names=meta.label_names,
        )
    else:
        result.update(perplexity=metrics["eval_perplexity"], token_accuracy=metrics["eval_token_accuracy"])
    if latency_calls:
        result.update(latency_figures(runtime_latencies(prepared, latency_calls)))
    return result
