"""`ds bench` as the acceptance script runs it: the JSON record, its ratios and checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")


def bench(name, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "bench", name, "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert {"bench", "version", "commit", "torch", "device", "threads", "settings", "results", "ratios",
            "checks"} <= record.keys()
    return record


@pytest.mark.slow
def test_trainer_overhead_quick(tmp_path):
    record = bench("trainer-overhead", tmp_path)
    assert record["checks"]["weights_identical"] is True
    # a wall-clock ratio is a figure for `ds bench`, not a gate: only a 2x loss (a real overhead bug) fails here
    assert record["ratios"]["trainer_vs_raw"] >= 0.5
    assert {"raw_pytorch", "fullchain"} <= record["results"].keys()


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist")
def test_amp_quick(tmp_path):
    record = bench("amp", tmp_path)
    assert {"fp32", "bf16"} <= record["results"].keys()
    assert record["ratios"]["bf16_vs_fp32_speed"] > 0
    assert 0 <= record["results"]["bf16"]["test_accuracy"] <= 1


def test_unknown_benchmark_is_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "bench", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "known: trainer-overhead, amp, checkpoint, comm" in result.stderr


def test_checkpoint_quick(tmp_path):
    record = bench("checkpoint", tmp_path)
    assert record["checks"]["resume_bit_exact"] is True
    # acceptance asks <= 0.2 on a quiet machine (measured 0.08); the bound here leaves room for a busy CI host
    assert record["ratios"]["async_block_vs_sync"] <= 0.5
    assert record["results"]["fullchain_async"]["persist_s"] > record["results"]["fullchain_async"]["blocking_s"]


@pytest.mark.slow
def test_comm_quick(tmp_path):
    record = bench("comm", tmp_path)
    assert record["ratios"]["int8_bytes_vs_fp32"] <= 0.27
    assert record["ratios"]["int8_accuracy_vs_fp32"] >= 0.98


def test_fusion_quick(tmp_path):
    record = bench("fusion", tmp_path)
    assert record["checks"]["parity"] is True
    # acceptance: >= 1.1 and <= 0.8 at the longest quick sequence (measured 1.57 and 0.38 on a busy host)
    assert record["ratios"]["passes_vs_eager_latency"] >= 1.1
    assert record["ratios"]["passes_vs_eager_peak_memory"] <= 0.8
    assert record["settings"]["passes_applied"]["small"] == {"fuse_qkv": 4, "fuse_attention": 4}
    assert record["settings"]["passes_applied"]["cnn"]["fold_conv_bn"] > 0
