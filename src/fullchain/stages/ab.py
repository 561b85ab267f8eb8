"""`ds ab A B`: are two artifacts different on the same examples, and which one is better?

Both models answer every example of the same data (each through the runtime it serves with, as `ds evaluate`
scores it). The evidence:
- McNemar's exact test on the paired correctness: only the examples one model gets right and the other wrong
  (the discordant pairs) carry information; under "no difference" each such example is a fair coin, so the
  p-value is a two-sided binomial test (`scipy.stats.binomtest`) on those counts;
- paired bootstrap confidence intervals (`scipy.stats.bootstrap`, percentile, fixed seed) of B - A in
  accuracy and macro-F1: the examples are resampled together, so both models always meet the same sample;
- batch-1 latency distributions, timed alternately A, B, A, B... on the same examples, so background load
  hits both alike.

The verdict is McNemar's at `alpha`: "A better", "B better" or "no significant difference".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest, bootstrap

from fullchain.errors import UserError
from fullchain.optimize.measure import median_p99_ms
from fullchain.stages.evaluate import Prepared, predicted_labels, prepare, runtime_latencies

A_BETTER, B_BETTER, NO_DIFFERENCE = "A better", "B better", "no significant difference"


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: `a_only` examples only A gets right, `b_only`
    examples only B gets right."""
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(b_only, a_only + b_only, 0.5).pvalue)


def macro_f1(truth: np.ndarray, predicted: np.ndarray, num_classes: int, axis: int = -1) -> np.ndarray:
    """Macro-F1 over all `num_classes` classes (a class absent from both scores 0, as `ds evaluate` counts it),
    along `axis`, so a whole stack of bootstrap resamples is scored at once."""
    scores = []
    for k in range(num_classes):
        is_true, is_predicted = truth == k, predicted == k
        hits = (is_true & is_predicted).sum(axis=axis)
        total = is_true.sum(axis=axis) + is_predicted.sum(axis=axis)
        scores.append(np.divide(2 * hits, total, out=np.zeros(np.shape(total)), where=total > 0))
    return np.mean(scores, axis=0)


def accuracy(truth: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    return (truth == predicted).mean(axis=axis)


def paired_bootstrap(truth: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int,
                     confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """B - A in accuracy and macro-F1 with percentile bootstrap intervals over the examples, resampled in pairs."""
    statistics = {
        "accuracy": lambda t, a, b, axis=-1: accuracy(t, b, axis) - accuracy(t, a, axis),
        "macro_f1": lambda t, a, b, axis=-1: (macro_f1(t, b, num_classes, axis) - macro_f1(t, a, num_classes, axis)),
    }
    result = {}
    for name, statistic in statistics.items():
        interval = bootstrap((truth, pred_a, pred_b), statistic, paired=True, vectorized=True,
                             n_resamples=resamples, confidence_level=confidence, method="percentile",
                             random_state=np.random.default_rng(seed)).confidence_interval
        result[name] = {"difference": float(statistic(truth, pred_a, pred_b)), "low": float(interval.low),
                        "high": float(interval.high)}
    return result


def verdict(a_only: int, b_only: int, p_value: float, alpha: float) -> str:
    if p_value >= alpha:
        return NO_DIFFERENCE
    return B_BETTER if b_only > a_only else A_BETTER


def _as_names(prepared: Prepared, indices: np.ndarray) -> np.ndarray:
    return np.asarray(prepared.loaded.label_names, dtype=object)[indices]


def _alternating_latencies(a: Prepared, b: Prepared, calls: int) -> tuple[list[float], list[float]]:
    """Batch-1 latencies of A and B in turns of ten calls each, so a burst of background load hits both."""
    seconds_a, seconds_b = [], []
    for _ in range(max(1, calls // 10)):
        seconds_a += runtime_latencies(a, 10, warmup=1)
        seconds_b += runtime_latencies(b, 10, warmup=1)
    return seconds_a, seconds_b


def _latency(seconds: list[float]) -> dict[str, float]:
    p50, p99 = median_p99_ms(seconds)
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "p99_ms": p99, "mean_ms": float(ms.mean()),
            "calls": len(seconds)}


def compare_artifacts(
    path_a: str | Path,
    path_b: str | Path,
    data: str | None = None,
    split: str | None = None,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
    latency_calls: int = 200,
    batch_size: int = 64,
    trust_code: bool = False,
) -> dict[str, Any]:
    """A against B on the same examples: both models' figures, McNemar, bootstrap intervals, latencies, verdict."""
    if not 0 < alpha < 1:
        raise UserError(f"--alpha {alpha}: must lie between 0 and 1")
    a = prepare(path_a, data, split, trust_code=trust_code)
    b = prepare(path_b, data, split, trust_code=trust_code)
    if not a.loaded.label_names or not b.loaded.label_names:
        raise UserError("ds ab compares classifiers; for a language model use ds evaluate on each")
    truth_a, pred_a = predicted_labels(a, batch_size)
    truth_b, pred_b = predicted_labels(b, batch_size)
    truth = _as_names(a, truth_a)
    if len(truth_a) != len(truth_b) or not np.array_equal(truth, _as_names(b, truth_b)):
        raise UserError(f"{path_a} and {path_b} do not see the same examples (their data recipes differ): "
                        "pass --data FILE or a dataset name for both")
    vocabulary = sorted(set(a.loaded.label_names) | set(b.loaded.label_names))
    code = {name: i for i, name in enumerate(vocabulary)}
    as_codes = np.vectorize(code.__getitem__, otypes=[np.int64])
    t, pa, pb = as_codes(truth), as_codes(_as_names(a, pred_a)), as_codes(_as_names(b, pred_b))
    right_a, right_b = pa == t, pb == t
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p_value = mcnemar_exact(a_only, b_only)
    seconds_a, seconds_b = _alternating_latencies(a, b, latency_calls)
    return {
        "a": {"model": str(path_a), "runtime": a.loaded.runtime.name, "accuracy": float(accuracy(t, pa)),
              "macro_f1": float(macro_f1(t, pa, len(vocabulary))), "latency": _latency(seconds_a)},
        "b": {"model": str(path_b), "runtime": b.loaded.runtime.name, "accuracy": float(accuracy(t, pb)),
              "macro_f1": float(macro_f1(t, pb, len(vocabulary))), "latency": _latency(seconds_b)},
        "n": len(t),
        "split": a.split,
        "mcnemar": {"a_only_correct": a_only, "b_only_correct": b_only, "p_value": p_value},
        "bootstrap": {"confidence": 1 - alpha, "resamples": resamples, "seed": seed,
                      **paired_bootstrap(t, pa, pb, len(vocabulary), 1 - alpha, resamples, seed)},
        "alpha": alpha,
        "verdict": verdict(a_only, b_only, p_value, alpha),
    }
