"""`ds serve` as a client meets it: a real uvicorn server in a subprocess on 127.0.0.1, real HTTP requests.

Predictions match `ds evaluate`, bad input gets 4xx and the server stays up, property-based requests never
get a 5xx, a full queue answers 503 with Retry-After, SIGTERM answers every accepted request before exit,
and an exported ONNX model serves the same labels as torch.
"""

import asyncio
import importlib.util
import json
import signal
import socket

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fullchain import metric_names as names
from fullchain.artifact import load
from fullchain.config import validate_config
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.preprocess import Preprocessor
from fullchain.deploy.process import ServerProcess
from fullchain.stages.evaluate import evaluate_artifact
from fullchain.stages.export import export_artifact

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def server(digits_mlp, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with ServerProcess(["serve", str(digits_mlp), "--max-wait-ms", "5", "--max-body-bytes", "200000"],
                       log=log) as running:
        yield running
    assert running.proc.returncode == 0, log.read_text()


async def post_all(url: str, bodies: list[dict], concurrency: int, headers: dict | None = None) -> list:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_concurrent_requests_get_the_predictions_of_ds_evaluate(server, digits_mlp):
    evaluated = evaluate_artifact(digits_mlp, split="test")
    bodies = sample_requests(digits_mlp, n=evaluated["n"], items_per_request=1)
    # regroup into requests of 1 to 4 images, so batches mix request sizes
    items = [body["images"][0] for body in bodies]
    sizes = [1 + i % 4 for i in range(len(items))]
    grouped, start = [], 0
    for size in sizes:
        if start >= len(items):
            break
        grouped.append({"images": items[start:start + size]})
        start += size
    responses = asyncio.run(post_all(server.url + "/v1/predict", grouped, concurrency=24))
    assert all(r.status_code == 200 for r in responses)
    predicted = [p["label"] for r in responses for p in r.json()["predictions"]]
    assert len(predicted) == evaluated["n"]

    from fullchain.config import DataConfig
    from fullchain.data import build_data

    spec_data = json.loads((digits_mlp / "model.json").read_text())["data"]
    bundle = build_data(DataConfig.model_validate(spec_data["config"]), spec_data["seed"])
    truth = [bundle.label_names[int(sample["labels"])] for sample in bundle.test]
    names_ = evaluated["label_names"]
    confusion = np.zeros((len(names_), len(names_)), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        confusion[names_.index(t), names_.index(p)] += 1
    assert confusion.tolist() == evaluated["confusion_matrix"]
    metrics = httpx.get(server.url + "/metrics").text
    batches = next(float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith(names.SERVE_BATCH_SIZE + "_count"))
    assert batches < len(grouped)  # some requests shared a forward pass


IMAGE = [[float((r * 8 + c) % 17) for c in range(8)] for r in range(8)]
BAD_REQUESTS = {
    "malformed JSON": (b'{"images": [[[1, 2', 422, "JSON"),
    "unknown field": (json.dumps({"images": [IMAGE], "extra": 1}).encode(), 422, "extra"),
    "wrong field for the model": (json.dumps({"texts": ["hello"]}).encode(), 422, "images"),
    "wrong item type": (json.dumps({"images": [True]}).encode(), 422, "images"),
    "wrong shape": (json.dumps({"images": [[row[:7] for row in IMAGE]]}).encode(), 422, "shape [1, 8, 7]"),
    "ragged rows": (json.dumps({"images": [[IMAGE[0], IMAGE[1][:3]]]}).encode(), 422, "different lengths"),
    "NaN": (json.dumps({"images": [[[float("nan")] * 8] * 8]}).encode(), 422, "finite"),
    "Infinity": (b'{"images": [[[Infinity, 1, 2, 3, 4, 5, 6, 7]]]}', 422, "finite"),
    "empty list": (json.dumps({"images": []}).encode(), 422, "at least 1"),
    "too many items": (json.dumps({"images": [IMAGE] * 257}).encode(), 422, "at most 256"),
    "not an object": (b"[1, 2, 3]", 422, "dictionary"),
    "not base64": (json.dumps({"images": ["not a png!"]}).encode(), 422, "base64"),
    "oversized body": (b'{"images": ["' + b"A" * 300_000 + b'"]}', 413, "bytes"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_stays_up(server, case):
    body, status, phrase = BAD_REQUESTS[case]
    response = httpx.post(server.url + "/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert phrase.lower() in response.json()["detail"].lower()
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.post(server.url + "/v1/predict", json={"images": [IMAGE]}).status_code == 200


def test_png_images_and_the_probes_metrics_and_schema(server):
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.array(IMAGE, dtype=np.uint8), mode="L").save(png, format="PNG")
    encoded = base64.b64encode(png.getvalue()).decode()
    both = httpx.post(server.url + "/v1/predict", json={"images": [encoded, IMAGE]}).json()["predictions"]
    assert both[0] == both[1]  # the same pixels, as PNG and as an array
    assert httpx.get(server.url + "/readyz").json() == {"ready": True}
    metrics = httpx.get(server.url + "/metrics").text
    for name in (names.SERVE_REQUEST_SECONDS, names.SERVE_QUEUE_WAIT_SECONDS, names.SERVE_INFERENCE_SECONDS,
                 names.SERVE_BATCH_SIZE, names.SERVE_REQUESTS_TOTAL, names.SERVE_IN_FLIGHT, names.SERVE_QUEUE_DEPTH):
        assert f"# TYPE {name.removesuffix('_total')}" in metrics
    assert f'{names.SERVE_REQUESTS_TOTAL}{{status="200"}}' in metrics
    if importlib.util.find_spec("fullchain.monitor.dashboard") is not None:
        assert httpx.get(server.url + "/dashboard").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/predict" in schema["paths"] and "ImageRequest" in schema["components"]["schemas"]


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | finite | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
near_valid_images = st.lists(
    st.lists(st.lists(finite, min_size=0, max_size=9), min_size=0, max_size=9)
    | st.lists(st.lists(st.lists(finite, max_size=9), max_size=9), max_size=2)
    | st.text(max_size=40),
    max_size=4,
)
bodies_ = (st.fixed_dictionaries({"images": near_valid_images}, optional={"texts": json_values})
           | st.fixed_dictionaries({"images": json_values}) | json_values)


def never_5xx(url: str, strategy, examples: int) -> None:
    """Hypothesis-generated bodies (valid, near-valid and arbitrary JSON) never get a server error."""
    client = httpx.Client(base_url=url, timeout=30)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=strategy)
    def check(body):
        raw = json.dumps(body, allow_nan=True).encode()
        response = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (raw[:300], response.text[:300])

    check()
    assert client.get("/healthz").status_code == 200


def test_property_based_requests_never_get_a_5xx(server):
    never_5xx(server.url, bodies_, examples=150)


def test_full_queue_gets_503_and_sigterm_answers_every_accepted_request(digits_mlp, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    auth = {"authorization": f"Bearer {TOKEN}"}
    srv = ServerProcess(["serve", str(digits_mlp), "--queue-size", "8", "--max-wait-ms", "20000",
                         "--max-batch-size", "64", "--token-file", str(token_file)], log=tmp_path / "serve.log")
    srv.start()
    try:
        assert httpx.post(srv.url + "/v1/predict", json={"images": [IMAGE]}).status_code == 401
        # A client still uploading its body counts as arriving, so the batch keeps waiting for it (up to
        # max_wait): the queue fills deterministically.
        body = json.dumps({"images": [IMAGE]}).encode()
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {TOKEN}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body[:10])

        async def flood():
            async with httpx.AsyncClient(timeout=60, headers=auth) as client:
                tasks = [asyncio.create_task(client.post(srv.url + "/v1/predict", json={"images": [IMAGE]}))
                         for _ in range(12)]
                rejected = []
                while len(rejected) < 4:
                    done = [t for t in tasks if t.done()]
                    rejected = [t.result() for t in done]
                    await asyncio.sleep(0.05)
                queued = await client.get(srv.url + "/metrics")
                srv.proc.send_signal(signal.SIGTERM)  # with 8 requests accepted and waiting for a batch
                await asyncio.sleep(0.3)
                slow.sendall(body[10:])  # the upload in progress at SIGTERM is answered too (queue full: 503)
                return rejected, await asyncio.gather(*tasks), queued.text

        rejected, answers, metrics = asyncio.run(flood())
        assert f"{names.SERVE_QUEUE_DEPTH} 8.0" in metrics
        assert all(r.status_code == 503 and r.headers["retry-after"] == "1" for r in rejected)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 8 + [503] * 4
        assert all(len(r.json()["predictions"]) == 1 for r in answers if r.status_code == 200)
        slow.settimeout(30)
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer
        assert srv.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/healthz")
    finally:
        srv.stop()


def test_exported_onnx_text_model_serves_the_labels_torch_gives(bbc_transformer, tmp_path):
    model_dir = bbc_transformer
    onnx_path = tmp_path / "deploy" / "model.onnx"
    assert export_artifact(model_dir, onnx_path).parity_ok
    texts = [body["texts"][0] for body in sample_requests(model_dir, n=40)] + ["", "   ", "zzzz qqqq"]
    with ServerProcess(["serve", str(onnx_path)], log=tmp_path / "serve.log") as srv:
        bodies = [{"texts": texts[i:i + 3]} for i in range(0, len(texts), 3)]
        responses = asyncio.run(post_all(srv.url + "/v1/predict", bodies, concurrency=8))
        never_5xx(srv.url, st.fixed_dictionaries({"texts": st.lists(st.text(max_size=200), max_size=6)}) | bodies_,
                  examples=60)
    served = [p for r in responses for p in r.json()["predictions"]]
    loaded = load(model_dir, "torch")
    pre = Preprocessor(loaded)
    with torch.inference_mode():
        probs = [torch.softmax(loaded.runtime.model(*pre.collate(pre.encode([t]))), -1)[0] for t in texts]
    assert [p["label"] for p in served] == [loaded.label_names[int(p.argmax())] for p in probs]
    assert np.allclose([p["score"] for p in served], [float(p.max()) for p in probs], atol=1e-4)


def test_ds_run_exports_serves_under_load_and_records_the_figures(tmp_path):
    from fullchain.stages.run import run_pipeline

    cfg = validate_config({
        "name": "chain", "runs_dir": str(tmp_path), "model": {"name": "mlp"}, "data": {"name": "digits"},
        "train": {"max_steps": 20, "progress": False, "tensorboard": False}, "checkpoint": {"enabled": False},
        "export": {"enabled": True}, "serve": {"enabled": True, "runtime": "onnxruntime", "load_seconds": 1,
                                                "load_concurrency": 8},
    })
    result = run_pipeline(cfg)
    summary = result.summary
    assert not result.failed and json.loads((tmp_path / "chain" / "summary.json").read_text()) == summary
    export, serve = summary["export"], summary["serve"]
    assert export["parity_ok"] and export["parity_max_abs_error"] < 1e-4
    assert export["latency_ms_batch1"]["onnxruntime_ms"] > 0
    assert serve["throughput_rps"] > 0 and serve["p99_ms"] >= serve["p50_ms"] > 0
    assert set(serve["statuses"]) == {"200"} and serve["drained_on_sigterm"]
