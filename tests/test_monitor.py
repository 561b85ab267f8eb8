"""The monitor as a user meets it: ds-monitor against live endpoints, the findings it ranks first, the
report it writes, ds profile, ds logs analyze, and the training run's own /metrics endpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fullchain.monitor.exporter import TrainingExporter
from fullchain.monitor.profile import profile_report, profile_trainer
from fullchain.monitor.rules import THRESHOLDS, diagnose
from fullchain.monitor.scrape import Scraper, parse_metrics
from fullchain.monitor.series import histogram_delta, observation_facts
from fullchain.train.checkpoint import Checkpointer
from monitor_support import TrainingInThread, digits_trainer

DS = [sys.executable, "-m", "fullchain.cli"]
MONITOR = [sys.executable, "-c", "from fullchain.monitor.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200"}


def run(cmd, timeout=120):
    return subprocess.run([*map(str, cmd)], capture_output=True, text=True, timeout=timeout, env=ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run(tmp_path: Path, **train) -> Path:
    raw = {"name": "t", "runs_dir": str(tmp_path / "runs"), "model": {"name": "mlp"}, "data": {"name": "digits"},
           "train": {"max_steps": 30, "batch_size": 32, "log_every": 5, "progress": False, "tensorboard": False,
                     **train},
           "checkpoint": {"enabled": True, "every_steps": 10}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_histogram_quantiles_from_a_scraped_prometheus_histogram():
    registry = CollectorRegistry()
    hist = Histogram("serve_request_duration_seconds", "x", buckets=(0.01, 0.02, 0.05, 0.1), registry=registry)
    for ms in range(1, 101):  # 1..100 ms, uniform
        hist.observe(ms / 1000)
    before = parse_metrics("", t=0.0)
    after = parse_metrics(generate_latest(registry).decode(), t=1.0)
    delta = histogram_delta(before, after, "serve_request_duration_seconds")
    assert delta.count == 100
    assert delta.mean == pytest.approx(0.0505)
    assert 0.045 <= delta.quantile(0.5) <= 0.055  # inside the 20-50 ms bucket, interpolated linearly
    assert 0.09 <= delta.quantile(0.95) <= 0.1


def test_rules_rank_by_impact_and_quote_their_thresholds():
    facts = {"requests": 500, "queue_share": 0.92, "inference_share": 0.05, "batch_mean": 1.0, "in_flight_peak": 32,
             "error_share": 0.0, "steps": 0}
    findings = diagnose(facts)
    assert [f.rule for f in findings] == ["serve_queue"]
    top = findings[0]
    assert top.settings == {"serve.max_batch_size": 32} and "--max-batch-size 32" in top.command
    assert top.evidence[0].threshold == THRESHOLDS["queue_share"][0] and top.evidence[0].value == 0.92
    # the same queue with full batches: the advice turns to cheaper inference
    saturated = diagnose({**facts, "batch_mean": 16.0})[0]
    assert saturated.rule == "serve_queue" and "optimize.quantize" in saturated.settings
    # training: a NaN loss outranks everything, a data share under the threshold says nothing
    train = diagnose({"steps": 100, "data_share": 0.1, "comm_share": 0.4, "loss": [2.0, 1.5, float("nan")]})
    assert [f.rule for f in train] == ["train_loss_nan", "train_comm"]


def test_rules_find_a_loss_spike_and_a_throughput_drop_after_warm_up():
    losses = [2.0, 1.8, 1.6, 1.5, 1.4, 9.0, 1.3]
    steady = [1000.0] * 20
    findings = diagnose({"steps": 100, "loss": losses, "samples_per_s": steady[:15] + [500.0] * 5})
    assert [f.rule for f in findings] == ["train_throughput_drop", "train_loss_spike"]
    assert findings[0].evidence[0].value == pytest.approx(0.5)
    assert findings[1].evidence[0].value == pytest.approx(9.0 / 1.6)
    # a slow first interval (warm-up) and a smooth loss are no finding
    assert diagnose({"steps": 100, "loss": losses[:5], "samples_per_s": [200.0] * 3 + steady}) == []


def test_slow_dataset_training_endpoint_top_finding_is_data_loading_and_ds_monitor_reports_it(tmp_path):
    with TrainingInThread(sleep_s=0.004, steps=400) as training:
        scraper = Scraper(training.url)
        time.sleep(1.0)
        report = tmp_path / "train.html"
        result = run([*MONITOR, "--endpoint", training.url.removeprefix("http://"), "--metrics",
                      "throughput,step_time,data_time,loss", "--interval", "0.5", "--duration", "4",
                      "--report", report], timeout=60)
        snaps = [scraper.scrape()]
        time.sleep(1.0)
        snaps.append(scraper.scrape())
        scraper.close()
    assert result.returncode == 0, result.stderr
    assert "1. Data loading stalls training steps" in result.stdout
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["findings"][0]["rule"] == "train_data"
    assert data["findings"][0]["settings"] == {"train.num_workers": 4}
    html = report.read_text()
    assert html.count('<img class="plot"') >= 3 and 'id="findings"' in html
    # the same verdict straight from two scrapes of the endpoint
    assert diagnose(observation_facts(snaps))[0].rule == "train_data"


def test_blocking_checkpoints_are_the_top_finding_of_the_training_endpoint(tmp_path):
    """Synchronous saves after every step of a tiny model: save() holds the loop longer than the step."""
    exporter = TrainingExporter(port=0)
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last=1, async_save=False)
    trainer = digits_trainer(0.0, steps=30, callbacks=[exporter], checkpointer=checkpointer, checkpoint_every=1)
    scraper = Scraper(exporter.url)
    try:
        before = scraper.scrape()
        trainer.fit()  # the exporter closes at the end of training: scrape from the last step's end
    finally:
        checkpointer.close()
    after = parse_metrics(generate_latest(exporter.registry).decode(), t=1.0)
    scraper.close()
    findings = diagnose(observation_facts([before, after]))
    assert findings[0].rule == "train_checkpoint", findings
    assert findings[0].settings == {"checkpoint.async_save": True}
    assert after.get("train_checkpoint_blocked_seconds_count") >= 29


def test_ctrl_c_ends_the_watch_and_still_writes_the_report(tmp_path):
    report = tmp_path / "r.html"
    with TrainingInThread(sleep_s=0.002, steps=3000) as training:
        watch = subprocess.Popen([*MONITOR, "--endpoint", training.url, "--metrics", "step_time", "--interval", "0.3",
                                  "--report", str(report)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=ENV)
        time.sleep(4)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "report written to" in out and json.loads(report.with_suffix(".json").read_text())["series"]["step_p50"]


def test_profile_of_a_slow_dataset_blames_data_loading(tmp_path):
    trainer = digits_trainer(sleep_s=0.01, steps=100)  # 160 ms of sleep per step: data wins even on a busy machine
    result = profile_trainer(trainer, steps=6, out_dir=tmp_path)
    shares = result.shares()
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    assert shares["data"] > 0.5 and result.seconds["forward"] > 0 and result.seconds["optimizer"] > 0
    assert any("mm" in op["op"] for op in result.top_ops)  # the MLP's matrix products are among the top operators
    assert "traceEvents" in json.loads((tmp_path / "trace.json").read_text())
    assert profile_report(result, "slow digits").findings[0].rule == "train_data"


def test_ds_profile_writes_the_split_a_chrome_trace_and_a_report(tmp_path):
    result = run([*DS, "profile", write_run(tmp_path), "--steps", "4"])
    assert result.returncode == 0, result.stderr
    for phase in ("data", "forward", "backward", "optimizer", "comm"):
        assert phase in result.stdout
    out = tmp_path / "runs" / "t" / "profile"
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    assert "Top operators" in (out / "report.html").read_text()


def test_ds_profile_reads_dict_batches_and_profiles_the_placed_model(tmp_path):
    """A text run (dict batches) with its token table placed: `ds profile` profiles what `ds train` would run."""
    raw = {"name": "text", "runs_dir": str(tmp_path / "runs"), "seed": 0,
           "data": {"name": "bbc_news", "max_samples": 200, "tokenizer": {"vocab_size": 600, "max_length": 48}},
           "model": {"name": "transformer", "args": {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64}},
           "train": {"batch_size": 16}, "distributed": {"placement": {"enabled": True, "sparse_threshold_mb": 0.05}}}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run([*DS, "profile", str(path), "--steps", "3"])
    assert result.returncode == 0, result.stderr
    trace = (tmp_path / "runs" / "text" / "profile" / "trace.json").read_text()
    assert "SparseAdam.step" in trace  # the table's own optimiser ran under the profiler


def test_unreachable_endpoint_retries_then_exits_1_with_a_clear_message():
    result = run([*MONITOR, "--endpoint", f"127.0.0.1:{free_port()}", "--duration", "1.5", "--interval", "0.3"])
    assert result.returncode == 1
    assert "never reached http://127.0.0.1:" in result.stderr and "retry" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_metric_group_is_a_usage_error():
    result = run([*MONITOR, "--metrics", "latency,vibes", "--duration", "1"])
    assert result.returncode == 2 and "vibes" in result.stderr and "Traceback" not in result.stderr


def test_logs_analyze_a_real_run_then_one_with_nan_and_a_restart(tmp_path):
    # 30 one-millisecond steps: any checkpoint is a real share of such a run; this one is about the loss log
    assert run([*DS, "run", write_run(tmp_path), "--set", "checkpoint.enabled=false"]).returncode == 0
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "summary.json").read_text())  # ds run writes the run's report itself
    assert summary["monitor"]["report"] == str(run_dir / "report.html")
    assert '<img class="plot"' in (run_dir / "report.html").read_text()
    clean = run([*DS, "logs", "analyze", run_dir])
    assert clean.returncode == 0, clean.stderr
    assert "logged steps                     30" in clean.stdout and "no bottleneck" in clean.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    with open(run_dir / "metrics.jsonl", "a") as f:  # what a restarted run that diverged leaves behind
        f.write(json.dumps({"step": 20, "time": last["time"] + 1, "event": "resume", "steps_lost": 10,
                            "restart_count": 1}) + "\n")
        f.write(json.dumps({**last, "step": 35, "time": last["time"] + 2, "train_loss": "nan"}) + "\n")
    report = tmp_path / "logs.html"
    broken = run([*DS, "logs", "analyze", run_dir, "--report", report])
    assert broken.returncode == 0, broken.stderr
    data = json.loads(report.with_suffix(".json").read_text())
    assert [f["rule"] for f in data["findings"]][:2] == ["train_loss_nan", "train_restarts"]
    assert "training loss" in report.read_text()
    missing = run([*DS, "logs", "analyze", tmp_path / "nowhere"])
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_ds_train_with_monitor_port_serves_metrics_and_the_dashboard(tmp_path):
    port = free_port()
    proc = subprocess.Popen([*DS, "train", str(write_run(tmp_path, max_steps=20000)), "--set",
                             f"monitor.port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline, steps = time.monotonic() + 60, 0.0
        while time.monotonic() < deadline and steps < 20:
            try:
                snap = parse_metrics(httpx.get(f"http://127.0.0.1:{port}/metrics").text, 0.0)
                steps = snap.get("train_step_seconds_count", 0.0)
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        assert steps >= 20
        assert snap.get("train_loss") > 0 and snap.get("train_samples_total") > 0
        page = httpx.get(f"http://127.0.0.1:{port}/dashboard")
        assert page.status_code == 200 and "/dashboard/static/dashboard.js" in page.text
        assert "parseMetrics" in httpx.get(f"http://127.0.0.1:{port}/dashboard/static/dashboard.js").text
        assert httpx.get(f"http://127.0.0.1:{port}/dashboard/static/secrets.txt").status_code == 404
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_queue_bound_ds_serve_top_finding_is_the_queue_with_a_batching_suggestion(digits_mlp, tmp_path):
    """Acceptance: a live `ds serve` with max_batch_size 1 under 32 concurrent clients; ds-monitor for 5 s."""
    process = pytest.importorskip("fullchain.deploy.process", reason="ds serve (fullchain.deploy) is not installed")
    payloads = pytest.importorskip("fullchain.deploy.payloads")
    model_dir = digits_mlp
    bodies = tmp_path / "payloads.json"
    bodies.write_text(json.dumps(payloads.sample_requests(model_dir, 64)))
    report = tmp_path / "r.html"
    with process.ServerProcess(["serve", str(model_dir), "--max-batch-size", "1"]) as server:
        load = subprocess.Popen([sys.executable, "-m", "fullchain.deploy.loadgen", server.url + "/v1/predict",
                                 str(bodies), "--concurrency", "32", "--seconds", "8", "--warmup", "0.5"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        result = run([*MONITOR, f"--endpoint=localhost:{server.port}", "--metrics=latency,throughput",
                      "--duration", "5", "--report", report], timeout=60)
        load_out, _ = load.communicate(timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(load_out)["statuses"].get("200", 0) > 100
    data = json.loads(report.with_suffix(".json").read_text())
    top = data["findings"][0]
    assert top["rule"].startswith("serve_queue"), data["findings"]
    assert top["settings"]["serve.max_batch_size"] >= 8 and "--max-batch-size" in top["command"]
    assert data["facts"]["batch_mean"] == 1.0
    html = report.read_text()
    assert '<img class="plot"' in html and 'id="findings"' in html and "max_batch_size" in html


def test_monitor_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run([*DS, "train", write_run(tmp_path), "--set", f"monitor.port={port}"])
    assert result.returncode == 2
    assert f"monitor.port: metrics endpoint could not listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_monitor_overhead_quick_measures_all_three_while_scraped(tmp_path):
    out = tmp_path / "mo.json"
    result = run([*DS, "bench", "monitor-overhead", "--quick", "--json", out])
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"none", "fullchain", "prometheus_client"}
    assert record["checks"]["scraped_throughout"] is True
    # The overhead itself is `ds bench monitor-overhead`'s figure: quick chunks are too short for a wall-clock ratio
    # (a scraper's start-up lands inside them). The sanity bound is on the per-step update the endpoint adds,
    # timed inside the step: being watched must never cost half a step.
    speed = record["ratios"]["fullchain_vs_none_speed"]
    update_us = record["results"]["fullchain"]["callback_us_per_step"]
    step_us = 1000 * record["results"]["none"]["step_ms"]
    print(f"\nmonitored speed {speed:.3f}x unmonitored (quick, not asserted); update {update_us:.0f} us per "
          f"{step_us:.0f} us step")
    assert 0 < update_us < 0.5 * step_us, record["results"]
