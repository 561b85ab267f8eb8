"""Live A/B in `ds serve`: a real server on 127.0.0.1 splits requests between two models by weight, each answer
comes from the model its `X-Model-Variant` names, and the metrics count each variant apart."""

import asyncio

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fullchain import metric_names as names
from fullchain.artifact import load
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.preprocess import Preprocessor
from fullchain.deploy.process import ServerProcess
from fullchain.monitor.scrape import parse_metrics
from fullchain.monitor.variants import variant_table
from release_support import ds_in_process, trained

TOKEN = "ab-token-for-tests-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
WEIGHT_B, REQUESTS = 0.25, 240


def predicted_labels(model_dir, bodies: list[dict]) -> list[str]:
    loaded = load(model_dir)
    pre = Preprocessor(loaded)
    logits = loaded.runtime(*pre.collate(pre.encode([body["images"][0] for body in bodies])))
    return [loaded.label_names[i] for i in logits.argmax(-1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return trained(tmp_path_factory, "good"), trained(tmp_path_factory, "poor")


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16), timeout=60, headers=AUTH) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def counters(text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_traffic_splits_by_weight_and_each_variant_answers_with_its_own_model(models, tmp_path):
    model_a, model_b = models
    bodies = sample_requests(model_a, n=REQUESTS, items_per_request=1)
    expected = {"a": predicted_labels(model_a, bodies), "b": predicted_labels(model_b, bodies)}
    assert sum(x != y for x, y in zip(expected["a"], expected["b"], strict=True)) > REQUESTS // 4  # tellable apart
    (tmp_path / "token").write_text(TOKEN)
    args = ["serve", str(model_a), "--ab-model", str(model_b), "--ab-weight", str(WEIGHT_B),
            "--token-file", str(tmp_path / "token")]
    with ServerProcess(args, log=tmp_path / "serve.log") as server:
        assert httpx.post(server.url + "/v1/predict", json=bodies[0]).status_code == 401  # the token still guards
        metrics_before = httpx.get(server.url + "/metrics", headers=AUTH).text
        responses = asyncio.run(post_all(server.url + "/v1/predict", bodies))
        metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert server.proc.returncode == 0, (tmp_path / "serve.log").read_text()

    assert all(r.status_code == 200 for r in responses)
    variants = [r.headers["x-model-variant"] for r in responses]
    for i, (response, variant) in enumerate(zip(responses, variants, strict=True)):
        assert response.json()["predictions"][0]["label"] == expected[variant][i], f"request {i} ({variant})"
    n_b = variants.count("b")
    sd = np.sqrt(REQUESTS * WEIGHT_B * (1 - WEIGHT_B))
    assert abs(n_b - REQUESTS * WEIGHT_B) < 4.5 * sd, f"{n_b} of {REQUESTS} to b"  # fails 1 run in 150,000

    by_status = counters(metrics, names.SERVE_REQUESTS_TOTAL)
    assert by_status[(("status", "200"), ("variant", "a"))] == REQUESTS - n_b
    assert by_status[(("status", "200"), ("variant", "b"))] == n_b
    assert sum(v for k, v in by_status.items() if ("status", "401") in k) == 1  # counted for the variant drawn
    latency = counters(metrics, names.SERVE_REQUEST_SECONDS + "_count")
    batches = counters(metrics, names.SERVE_BATCH_SIZE + "_sum")
    for variant, count in (("a", REQUESTS - n_b), ("b", n_b)):
        answered = sum(v for k, v in by_status.items() if ("variant", variant) in k)
        assert latency[(("variant", variant),)] == answered  # every outcome timed under its variant
        assert batches[(("variant", variant),)] == count  # each model batched exactly its own requests

    # ds-monitor's report puts the two models side by side
    table = variant_table(parse_metrics(metrics_before, 0.0), parse_metrics(metrics, 2.0))
    rows = {row[0]: dict(zip(table.header, row, strict=True)) for row in table.rows}
    for variant, count in (("a", REQUESTS - n_b), ("b", n_b)):  # the 401 came before the first scrape
        assert rows[variant]["requests"] == count and rows[variant]["error share"] == 0.0
        assert 0 < rows[variant]["p50 ms"] <= rows[variant]["p99 ms"] and rows[variant]["mean batch"] >= 1


def test_a_weight_outside_0_1_exits_2_before_loading(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "not-loaded"  # the weight is refused before any model is looked at
    assert ds_in_process(monkeypatch, "serve", missing, "--ab-model", missing, "--ab-weight", "1.5") == 2
    assert "--ab-weight 1.5" in capsys.readouterr().err
