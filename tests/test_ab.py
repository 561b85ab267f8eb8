"""`ds ab`: McNemar's exact test and paired bootstrap intervals against known values, and verdicts on real models."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fullchain.stages.ab import A_BETTER, NO_DIFFERENCE, compare_artifacts, macro_f1, mcnemar_exact, paired_bootstrap
from release_support import trained


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return trained(tmp_path_factory, "good"), trained(tmp_path_factory, "poor")


def test_mcnemar_exact_matches_the_textbook_example():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, Table 1: airway hyper-responsiveness before
    # and after stem cell transplantation, discordant pairs 1 and 7; exact conditional p = 0.070 (= 18/256).
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)  # ten of ten: both tails of a fair coin


def test_paired_bootstrap_interval_agrees_with_the_normal_theory_interval():
    # n pairs, A alone right on 100, B alone right on 160: the difference in accuracy is 60/n with the paired
    # (McNemar) standard error sqrt((b + c) / n - ((c - b) / n)^2) / sqrt(n); with n = 2000 the percentile
    # bootstrap interval must sit on the normal-theory one.
    n, a_only, b_only, both = 2000, 100, 160, 1500
    truth = np.zeros(n, dtype=np.int64)
    pred_a, pred_b = np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    pred_a[:both + a_only] = 0
    pred_b[:both] = 0
    pred_b[both + a_only:both + a_only + b_only] = 0
    result = paired_bootstrap(truth, pred_a, pred_b, num_classes=2, resamples=2000, seed=0)["accuracy"]
    diff = (b_only - a_only) / n
    se = math.sqrt((a_only + b_only) / n - diff**2) / math.sqrt(n)
    assert result["difference"] == pytest.approx(diff)
    assert result["low"] == pytest.approx(diff - 1.96 * se, abs=0.002)
    assert result["high"] == pytest.approx(diff + 1.96 * se, abs=0.002)
    # a fixed seed gives the same interval
    assert paired_bootstrap(truth, pred_a, pred_b, 2, resamples=2000, seed=0)["accuracy"] == result


def test_vectorised_macro_f1_is_sklearns_over_all_classes():
    rng = np.random.default_rng(1)
    truth, predicted = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 is never predicted
    expected = f1_score(truth, predicted, labels=range(6), average="macro", zero_division=0)
    assert macro_f1(truth, predicted, num_classes=6) == pytest.approx(expected)
    stacked = macro_f1(np.stack([truth, truth]), np.stack([predicted, truth]), num_classes=6)
    assert stacked[0] == pytest.approx(expected) and stacked[1] == pytest.approx(5 / 6)


def test_an_artifact_against_itself_is_no_significant_difference(models):
    strong, _ = models
    result = compare_artifacts(strong, strong, resamples=200, latency_calls=20)
    assert result["verdict"] == NO_DIFFERENCE
    assert result["mcnemar"] == {"a_only_correct": 0, "b_only_correct": 0, "p_value": 1.0}
    for metric in ("accuracy", "macro_f1"):
        assert result["bootstrap"][metric] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    assert result["a"]["accuracy"] == result["b"]["accuracy"] and result["n"] > 300
    assert result["a"]["latency"]["calls"] == result["b"]["latency"]["calls"] == 20


def test_cli_ab_names_the_better_model_and_fails_a_regression_for_pipelines(models, tmp_path):
    strong, weak = models
    report = tmp_path / "ab.json"
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "ab", str(strong), str(weak), "--json",
                             str(report), "--fail-on-regression", "--resamples", "500", "--latency-calls", "20"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1, result.stderr
    assert "regression" in result.stderr and f"verdict: {A_BETTER}" in result.stdout
    recorded = json.loads(report.read_text())
    assert recorded["verdict"] == A_BETTER and recorded["mcnemar"]["p_value"] < 0.05
    assert recorded["mcnemar"]["a_only_correct"] > recorded["mcnemar"]["b_only_correct"]
    accuracy = recorded["bootstrap"]["accuracy"]
    assert accuracy["low"] <= accuracy["difference"] <= accuracy["high"] < 0  # B is worse, and surely so
    assert accuracy["difference"] == pytest.approx(recorded["b"]["accuracy"] - recorded["a"]["accuracy"])
