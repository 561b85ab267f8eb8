"""`ds evaluate --gate`: a release check a pipeline can stop on (exit 1 naming the metric; 2 for a bad expression)."""

import json
import os
import subprocess
import sys

import pytest

from fullchain.errors import UserError
from fullchain.stages.gates import Gate, check_gates, parse_gates
from release_support import ds_in_process, trained

DS = [sys.executable, "-m", "fullchain.cli"]


def ds(*args):
    return subprocess.run([*DS, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return trained(tmp_path_factory, "good")


def test_gate_expressions_parse_into_metric_operator_and_limit():
    assert parse_gates("accuracy>=0.95, macro_f1 >= .9,latency_p99_ms<=20,accuracy>=baseline-0.01") == [
        Gate("accuracy", ">=", 0.95), Gate("macro_f1", ">=", 0.9), Gate("latency_p99_ms", "<=", 20.0),
        Gate("accuracy", ">=", None, -0.01)]


@pytest.mark.parametrize(("text", "named"), [
    ("accuracy=>0.9", "'accuracy=>0.9'"),
    ("accuracy>=0.9,,macro_f1>=0.9", "''"),
    ("accuracy>=high", "'accuracy>=high'"),
    ("acuracy>=0.9", "unknown metric 'acuracy'"),
])
def test_a_malformed_gate_names_the_bad_term(text, named):
    with pytest.raises(UserError, match=named):
        parse_gates(text)


def test_gates_compare_with_fixed_limits_and_with_the_baseline():
    new, old = {"accuracy": 0.90, "latency_p99_ms": 12.0}, {"accuracy": 0.92, "latency_p99_ms": 30.0}
    results = check_gates(parse_gates("accuracy>=baseline-0.01,latency_p99_ms<=20,latency_p99_ms<=baseline"),
                          new, old)
    assert [(r.gate.metric, r.passed) for r in results] == [
        ("accuracy", False), ("latency_p99_ms", True), ("latency_p99_ms", True)]
    assert results[0].bound == pytest.approx(0.91)
    with pytest.raises(UserError, match="needs --baseline"):
        check_gates(parse_gates("accuracy>=baseline"), new)
    with pytest.raises(UserError, match="reports no perplexity"):
        check_gates(parse_gates("perplexity<=10"), new)


def test_cli_malformed_gate_exits_2_with_one_line_before_loading_anything(tmp_path, monkeypatch, capsys):
    code = ds_in_process(monkeypatch, "evaluate", tmp_path / "no-model-here", "--gate",
                         "accuracy>=0.9,latency_p99_ms<20")
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "'latency_p99_ms<20'" in lines[0]


def test_cli_failed_gate_exits_1_naming_the_metric_and_records_every_figure(model, tmp_path):
    report = tmp_path / "evaluate.json"
    result = ds("evaluate", model, "--baseline", model, "--json", report,
                "--gate", "accuracy>=0.999,macro_f1>=0.1,latency_p99_ms<=10000")
    assert result.returncode == 1, result.stderr
    assert "gate failed: accuracy" in result.stderr and "macro_f1" not in result.stderr
    table = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 6}
    assert "FAIL" in table["accuracy"] and "pass" in table["macro_f1"] and "pass" in table["latency_p99_ms"]
    recorded = json.loads(report.read_text())
    assert not recorded["gates_passed"]
    assert [g["metric"] for g in recorded["gates"] if not g["passed"]] == ["accuracy"]
    # latency timed in the serving runtime, for the new model and the baseline alike
    assert recorded["latency_p99_ms"] >= recorded["latency_p50_ms"] > 0
    assert recorded["baseline"]["accuracy"] == recorded["accuracy"] and recorded["baseline"]["latency_p99_ms"] > 0
