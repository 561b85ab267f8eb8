"""`ds serve` against hostile clients and careless operators: a real server subprocess on 127.0.0.1 (one
test runs the same app and uvicorn protocol in a thread, to make the model fail), real HTTP, and raw
sockets where a well-behaved client library would hide the attack.

An exposed server without a token refuses to start; a request without the token gets 401 before its body is
read; values that overflow float32 and non-finite model outputs get 422 naming the item, and the keep-alive
connection serves the next request; a 500 closes its connection cleanly; a decompression bomb is refused
from its header; a large input is decoded while other clients are answered; slow senders meet read
deadlines; no response shows a server path.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

from artifact_support import train
from fullchain import metric_names as names
from fullchain.deploy.process import ServerProcess, free_port
from test_serve import IMAGE, TOKEN

AUTH = {"authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 2.0
WAIT_S = 10.0  # a socket read that outlasts both deadlines: an old server holds the connection past it


@pytest.fixture(scope="module")
def guarded(digits_mlp, tmp_path_factory):
    """The digits model behind a token, with read deadlines short enough to wait for."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "token").write_text(TOKEN + "\n")
    args = ["serve", str(digits_mlp), "--token-file", str(root / "token"),
            "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)]
    with ServerProcess(args, log=root / "serve.log") as running:
        yield running
    assert running.proc.returncode == 0, (root / "serve.log").read_text()


def raw_request(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.settimeout(WAIT_S)
    conn.sendall(head + body)
    return conn


def read_until_closed(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def post_head(length: int, *extra: str) -> bytes:
    lines = ["POST /v1/predict HTTP/1.1", "host: x", "content-type: application/json", f"content-length: {length}",
             *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_serving_beyond_loopback_needs_a_token_or_insecure(digits_mlp, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "fullchain.cli", "serve", str(digits_mlp), "--host", "0.0.0.0",
                              "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert "--token-file" in refused.stderr and "--insecure" in refused.stderr
    log = tmp_path / "serve.log"
    with ServerProcess(["serve", str(digits_mlp), "--host", "0.0.0.0", "--insecure"], log=log) as srv:
        assert httpx.post(srv.url + "/v1/predict", json={"images": [IMAGE]}).status_code == 200
    assert "--insecure" in log.read_text()


def test_without_the_token_a_request_gets_401_before_its_body_is_read(guarded):
    # 5 MB declared, 10 bytes sent: a server that read the body first would wait for the rest (then 408)
    conn = raw_request(guarded.port, post_head(5_000_000), b'{"images":')
    answer = conn.recv(65536)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in answer
    wrong = {"authorization": "Bearer " + "x" * len(TOKEN)}
    assert httpx.post(guarded.url + "/v1/predict", json={"images": [IMAGE]}, headers=wrong).status_code == 401
    for path in ("/metrics", "/openapi.json"):
        assert httpx.get(guarded.url + path).status_code == 401
        assert httpx.get(guarded.url + path, headers=AUTH).status_code == 200
    for probe in ("/healthz", "/readyz"):
        assert httpx.get(guarded.url + probe).status_code == 200


def test_ds_monitor_scrapes_a_guarded_server_with_its_token_and_says_when_it_needs_one(guarded, tmp_path):
    monitor = [sys.executable, "-c", "from fullchain.monitor.cli import main; main()",
               f"--endpoint=127.0.0.1:{guarded.port}",
               "--duration", "1", "--interval", "0.2"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with_token = subprocess.run([*monitor, "--token-file", str(token_file), "--report", str(tmp_path / "r.html")],
                                capture_output=True, text=True, timeout=60)
    assert with_token.returncode == 0, with_token.stderr
    assert json.loads((tmp_path / "r.json").read_text())["facts"]  # it read the guarded /metrics

    without = subprocess.run(monitor, capture_output=True, text=True, timeout=60)
    assert without.returncode == 2 and "needs a bearer token: give --token-file" in without.stderr
    assert "Traceback" not in without.stderr


def test_values_beyond_float32_get_422_naming_the_item_and_the_connection_serves_the_next(guarded):
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=WAIT_S)
    headers = {**AUTH, "content-type": "application/json"}
    conn.request("POST", "/v1/predict", json.dumps({"images": [IMAGE, IMAGE, [[1e39] * 8] * 8]}), headers)
    answer = conn.getresponse()
    assert answer.status == 422
    assert json.loads(answer.read())["detail"].startswith("images.2.")
    kept = conn.sock
    conn.request("POST", "/v1/predict", json.dumps({"images": [IMAGE]}), headers)
    assert conn.getresponse().status == 200 and conn.sock is kept  # the same keep-alive connection
    conn.close()


@pytest.fixture(scope="module")
def features_server(tmp_path_factory):
    """A feature-table model trained on the digits scaled to [0, 1]: most columns have std < 1."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("features")
    digits = load_digits()
    np.savez(root / "digits.npz", x=digits.data / 16, y=digits.target)
    model_dir = train(root, "features", {"name": "mlp", "args": {"hidden": [32]}},
                      {"name": "npz", "path": str(root / "digits.npz")}, 40)
    with ServerProcess(["serve", str(model_dir)], log=root / "serve.log") as running:
        yield running


def test_a_non_finite_model_output_gets_422_naming_the_item_and_the_connection_serves_the_next(features_server):
    # 3e38 is a float32, but normalising it by a std below 1 overflows: the model computes inf - inf = NaN
    row = [0.5] * 64
    conn = http.client.HTTPConnection("127.0.0.1", features_server.port, timeout=WAIT_S)
    headers = {"content-type": "application/json"}
    conn.request("POST", "/v1/predict", json.dumps({"features": [row, [3e38] * 64]}), headers)
    answer = conn.getresponse()
    assert answer.status == 422
    assert json.loads(answer.read())["detail"].startswith("features[1]: the model's output is not finite")
    kept = conn.sock
    conn.request("POST", "/v1/predict", json.dumps({"features": [row]}), headers)
    assert conn.getresponse().status == 200 and conn.sock is kept
    conn.close()


class FailsOnHugeInput:
    """The real digits runtime, failing as a crashed kernel would when a batch holds a huge value."""

    def __init__(self, runtime):
        self.runtime, self.name = runtime, runtime.name

    def __call__(self, batch):
        if batch.abs().max() > 1000:
            raise RuntimeError("kernel failure")
        return self.runtime(batch)


@contextmanager
def app_in_thread(app, cfg):
    import uvicorn

    from fullchain.deploy.server import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, cfg))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{cfg.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_500_closes_its_connection_cleanly_and_the_client_carries_on(digits_mlp):
    from fullchain.artifact import load as load_runtime
    from fullchain.config import ServeConfig
    from fullchain.deploy.server import create_app

    loaded = load_runtime(digits_mlp)
    loaded.runtime = FailsOnHugeInput(loaded.runtime)
    cfg = ServeConfig(port=free_port())
    with app_in_thread(create_app(loaded, cfg), cfg) as url, httpx.Client(base_url=url, timeout=WAIT_S) as client:
        failed = client.post("/v1/predict", json={"images": [[[1e6] * 8] * 8]})
        assert failed.status_code == 500 and failed.headers["connection"] == "close"
        assert failed.json() == {"detail": "internal server error"}
        assert client.post("/v1/predict", json={"images": [IMAGE]}).status_code == 200


def peak_rss_bytes(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_a_decompression_bomb_and_a_100_megapixel_png_get_422_without_being_decoded(guarded):
    bomb = png(Image.new("1", (20_000, 20_000)))  # 400 megapixels in about 50 KB
    huge = png(Image.new("L", (10_000, 10_000)))  # 100 megapixels: 400 MB as float32
    before = peak_rss_bytes(guarded.proc.pid)
    for encoded, phrase in ((bomb, "400000000 pixels"), (huge, "10000x10000 pixels but the model takes 8x8")):
        answer = httpx.post(guarded.url + "/v1/predict", json={"images": [IMAGE, encoded]}, headers=AUTH,
                            timeout=WAIT_S)
        assert answer.status_code == 422
        assert answer.json()["detail"].startswith("images[1]: ") and phrase in answer.json()["detail"]
    assert peak_rss_bytes(guarded.proc.pid) - before < 64 * 2**20


@pytest.fixture(scope="module")
def text_server(bbc_transformer, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    args = ["serve", str(bbc_transformer), "--max-body-bytes", str(12 * 2**20)]
    with ServerProcess(args, log=root / "serve.log") as srv:
        yield srv


def test_a_large_input_is_decoded_while_other_clients_are_answered(text_server):
    texts = ["the quick brown fox jumps over the lazy dog " * 2000] * 90  # 8 MB: seconds of tokenising here
    answered = []

    def big_request():
        answered.append(httpx.post(text_server.url + "/v1/predict", json={"texts": texts}, timeout=120))

    worker = threading.Thread(target=big_request)
    probed_at = []
    with httpx.Client(base_url=text_server.url, timeout=WAIT_S) as client:
        worker.start()
        while worker.is_alive():
            assert client.get("/healthz").status_code == 200
            probed_at.append(time.monotonic())
    worker.join()
    assert answered[0].status_code == 200 and len(answered[0].json()["predictions"]) == 90
    # tokenising on the event loop left the probes unanswered for its whole duration (measured 2.8-3.3 s)
    assert max(np.diff(probed_at)) < 1.0, f"longest wait for /healthz: {max(np.diff(probed_at)):.2f} s"


def test_slow_senders_get_408_and_lose_the_connection_at_the_read_deadlines(guarded):
    half_headers = raw_request(guarded.port, b"POST /v1/predict HTTP/1.1\r\nhost: x\r\n")
    trickle = raw_request(guarded.port, b"POST /v1/predict HTTP/1.1\r\n")
    for byte in b"host: localhost\r\nx-slow: one byte every 100 ms\r\n":  # 5 s of headers
        if select.select([trickle], [], [], 0.1)[0]:  # answered; each byte used to restart uvicorn's only timer
            break
        trickle.sendall(bytes([byte]))
    head = post_head(1000, f"authorization: Bearer {TOKEN}")
    partial_body = raw_request(guarded.port, head, b'{"images": [[')
    for conn in (half_headers, trickle, partial_body):
        answer = read_until_closed(conn)  # WAIT_S without an answer raises TimeoutError
        conn.close()
        assert answer.startswith(b"HTTP/1.1 408")
    metrics = httpx.get(guarded.url + "/metrics", headers=AUTH).text
    assert f'{names.SERVE_REQUESTS_TOTAL}{{status="408"}} 1.0' in metrics  # the one that reached /v1/predict


def test_no_response_shows_a_server_path(guarded, digits_mlp):
    secret = str(digits_mlp.parent)
    schema = httpx.get(guarded.url + "/openapi.json", headers=AUTH).text
    bodies = [schema]
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=WAIT_S) as client:
        for body in ({"images": ["bm90IGFuIGltYWdl"]}, {"images": [[[1.0] * 3]]}, {"texts": ["x"]}, {"images": []}):
            answer = client.post("/v1/predict", json=body)
            assert answer.status_code == 422
            bodies.append(answer.text)
        bodies += [client.get("/nowhere").text, client.get("/v1/predict").text]
    bodies.append(httpx.post(guarded.url + "/v1/predict").text)
    for body in bodies:
        assert secret not in body and "site-packages" not in body and "Traceback" not in body
