"""`ds logs analyze runs/NAME`: what a finished (or crashed) run's files say about it.

Reads ``metrics.jsonl`` (step rows, evaluation rows, resume events) and the checkpoints' ``meta.json``
timings, turns them into the facts the bottleneck rules read (loss values, throughput per log interval, data
wait share, restarts, checkpoint blocking) and returns a summary plus the findings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from fullchain import metric_names as M
from fullchain.errors import UserError
from fullchain.monitor.report import Plot, Report, Table
from fullchain.monitor.rules import diagnose


def _float(value: Any) -> float:
    try:
        return float(value)  # metrics.jsonl keeps NaN/inf as the strings "nan"/"inf"
    except (TypeError, ValueError):
        return math.nan


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def checkpoint_blocking(run_dir: Path) -> tuple[list[float], int | None]:
    """staging_s of every kept checkpoint, and checkpoint.every_steps from the run's config.yaml."""
    staging = []
    for meta in sorted((run_dir / "checkpoints").glob("step-*/meta.json")):
        try:
            staging.append(float(json.loads(meta.read_text())["timing"]["staging_s"]))
        except (ValueError, KeyError, TypeError):
            continue
    every = None
    config = run_dir / "config.yaml"
    if config.is_file():
        every = ((yaml.safe_load(config.read_text()) or {}).get("checkpoint") or {}).get("every_steps")
    return staging, every


def rank_shares(row: dict[str, Any]) -> list[float]:
    """Each data rank's balanced share of the batch (distributed.balance), rank 0 first; [] when unbalanced."""
    prefix = M.TRAIN_RANK_BATCH_SAMPLES + "_rank"
    shares = {int(key[len(prefix):]): _float(value) for key, value in row.items()
              if key.startswith(prefix) and key[len(prefix):].isdigit()}
    return [shares[r] for r in sorted(shares)]


def log_facts(rows: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    steps_rows = [r for r in rows if M.TRAIN_LOSS in r]
    resumes = [r for r in rows if r.get("event") == "resume"]
    facts: dict[str, Any] = {
        "loss": [_float(r[M.TRAIN_LOSS]) for r in steps_rows],
        "samples_per_s": [_float(r.get(M.TRAIN_SAMPLES_PER_SECOND)) for r in steps_rows],
        "restarts": len(resumes),
        "steps_lost": sum(int(r.get("steps_lost", 0)) for r in resumes),
        "rank_batch_samples": rank_shares(steps_rows[-1]) if steps_rows else [],
    }
    if len(steps_rows) < 2:
        return {**facts, "steps": steps_rows[-1]["step"] if steps_rows else 0}
    # Each logged row covers the interval since the previous one; the first has no known start.
    wall = data = comm = 0.0
    steps = 0
    for before, after in zip(steps_rows, steps_rows[1:], strict=False):
        if after["step"] <= before["step"]:
            continue  # a restart redoes steps: the interval spans the restart
        wall += after["time"] - before["time"]
        steps += after["step"] - before["step"]
        data += _float(after.get(M.DATA_WAIT_SECONDS, 0.0))
        comm_after, comm_before = _float(after.get(M.COMM_SECONDS_TOTAL)), _float(before.get(M.COMM_SECONDS_TOTAL))
        if math.isfinite(comm_after) and math.isfinite(comm_before) and comm_after >= comm_before:
            comm += comm_after - comm_before
    staging, every = checkpoint_blocking(run_dir)
    saves = (steps_rows[-1]["step"] // every) if every else len(staging)
    blocked = (sum(staging) / len(staging)) * saves if staging else 0.0
    skipped = [_float(r.get(M.AMP_SKIPPED_STEPS_TOTAL, 0)) for r in steps_rows]
    facts.update({
        "steps": steps,
        "step_mean_s": wall / steps if steps else math.nan,
        "wall_s": wall,
        "data_share": data / wall if wall > 0 else math.nan,
        "comm_share": comm / wall if wall > 0 else math.nan,
        "checkpoint_share": blocked / wall if wall > 0 else math.nan,
        "checkpoint_blocked_mean_s": sum(staging) / len(staging) if staging else math.nan,
        "skipped_steps": max(skipped) - skipped[0] if skipped else 0.0,
    })
    return facts


def analyze_run(run_dir: Path) -> Report:
    """The log report of a run directory; raises UserError when it holds no metrics.jsonl."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a run directory, e.g. runs/<name>?)")
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path}: empty, nothing to analyse")
    facts = log_facts(rows, run_dir)
    step_rows = [r for r in rows if M.TRAIN_LOSS in r]
    evals = [r for r in rows if M.EVAL_LOSS in r]

    def series(key: str, label: str, source: list[dict[str, Any]]) -> Plot:
        points = [(float(r["step"]), _float(r[key])) for r in source if key in r and math.isfinite(_float(r[key]))]
        return Plot(key, label, "", points, xlabel="step")

    plots = [series(M.TRAIN_LOSS, "training loss", step_rows),
             series(M.TRAIN_SAMPLES_PER_SECOND, "training samples per second", step_rows),
             series(M.EVAL_ACCURACY, "evaluation accuracy", evals)]
    summary = Table("Run summary", ["figure", "value"], [
        ["logged steps", step_rows[-1]["step"] if step_rows else 0],
        ["final training loss", _float(step_rows[-1][M.TRAIN_LOSS]) if step_rows else math.nan],
        ["best evaluation accuracy", max((_float(r.get(M.EVAL_ACCURACY)) for r in evals), default=math.nan)],
        ["restarts / resumes", facts["restarts"]],
        ["mean step time (s)", facts.get("step_mean_s", math.nan)],
        ["data wait share", facts.get("data_share", math.nan)],
        ["mean checkpoint blocking (s)", facts.get("checkpoint_blocked_mean_s", math.nan)],
    ])
    return Report(f"ds logs analyze: {run_dir}", str(run_dir), diagnose(facts), facts,
                  plots=[p for p in plots if p.points], tables=[summary])
