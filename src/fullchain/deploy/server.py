"""`ds serve`: the FastAPI app (dynamic batching, Prometheus metrics, probes, bounded queue) and its runner.

With a second model (`--ab-model`), a live A/B: each request goes to one of the two by weight
(`split`), each model has its own batcher, every series is labelled by ``variant`` (`metrics`) and the answer
names its model in an `X-Model-Variant` header.

Endpoints: `POST /v1/predict`, `GET /healthz` (the process is up), `GET /readyz` (the model is loaded and
warm, and the server is not draining), `GET /metrics` (Prometheus text), `GET /openapi.json`, and the
monitor's `/dashboard` page when `fullchain.monitor.dashboard` is installed. SIGTERM (uvicorn's graceful
shutdown) stops accepting connections, answers every request already accepted, then exits 0.

Hostile clients: the bearer token (`auth`) is checked before a body is read; slow senders meet read
deadlines (`deadlines`); texts and encoded images are decoded in a worker thread, so a large one does not
stall the event loop; a failure answers a complete response, and a 500 says `Connection: close` (uvicorn
closes the connection after any exception; without the header the client would reuse it and meet a
reset); no response shows a server path.
"""

import functools
import importlib.util
import signal
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rich.console import Console

from fullchain.artifact import LoadedModel, load
from fullchain.bearer import read_token
from fullchain.config import ServeConfig
from fullchain.deploy.auth import BearerAuth, check_exposure, is_loopback
from fullchain.deploy.batching import DynamicBatcher, NonFiniteOutput, QueueFull
from fullchain.deploy.deadlines import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, READ_TIMED_OUT, H11WithDeadlines
from fullchain.deploy.metrics import VARIANT, ServeMetrics
from fullchain.deploy.preprocess import InputError, Preprocessor
from fullchain.deploy.schema import REQUEST_MODELS, PredictResponse
from fullchain.deploy.split import CANDIDATE, PRIMARY, TrafficSplit, check_weight
from fullchain.errors import UserError

PREDICT_PATH = "/v1/predict"
VARIANT_HEADER = "X-Model-Variant"  # live A/B: which model answered ("a" or "b")
# The inference thread re-takes the GIL after every torch op; with CPython's default 5 ms switch interval a
# busy event loop makes it wait up to that long each time (measured on 2 busy cores: about +15% at 64 clients).
SWITCH_INTERVAL_S = 0.0005
RETRY_AFTER_S = 1
DASHBOARD_MODULE = "fullchain.monitor.dashboard"
BOUND_ERRORS = {"less_than_equal": "<=", "greater_than_equal": ">=", "less_than": "<", "greater_than": ">"}


class BodyLimit:
    """413 for request bodies over `limit` bytes, by Content-Length or while the body streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class Arrivals:
    """How many accepted predict requests have not reached the batcher yet (being read, parsed, encoded)."""

    def __init__(self) -> None:
        self.count = 0
        self.on_settled = lambda: None  # the batcher re-checks whether to stop waiting for more

    def open(self, scope) -> None:
        self.count += 1
        scope.setdefault("state", {})["arriving"] = True

    def close(self, state) -> None:
        if state.get("arriving"):
            state["arriving"] = False
            self.count -= 1
            self.on_settled()


class Served:
    """One model behind the server: its preprocessor, its batcher (requests of different models never share a
    forward pass; `--queue-size` bounds each model's queue), the requests on their way to it, and its series."""

    def __init__(self, name: str, loaded: LoadedModel, cfg: ServeConfig, metrics: ServeMetrics):
        self.name, self.loaded = name, loaded
        self.pre = Preprocessor(loaded)
        self.metrics = metrics.of(name)
        self.arrivals = Arrivals()
        self.batcher = DynamicBatcher(self.infer, loaded.task.postprocess, cfg.max_batch_size,
                                      cfg.max_wait_ms / 1000, cfg.queue_size, self.metrics,
                                      arriving=lambda: self.arrivals.count)
        self.arrivals.on_settled = self.batcher.wake

    def infer(self, items: list):
        return self.loaded.runtime(*self.pre.collate(items))

    async def start(self) -> None:
        self.loaded.runtime(*self.loaded.task.example_inputs(1))  # pay first-call costs (allocations, kernels)
        await self.batcher.start()


class PredictMetrics:
    """Picks the model of every `POST /v1/predict` as it arrives (`TrafficSplit`), and records its latency, status
    and the in-flight gauge, whatever its outcome."""

    def __init__(self, app, metrics: ServeMetrics, served: dict[str, Served], split: TrafficSplit):
        self.app, self.metrics, self.served, self.split = app, metrics, served, split

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH:
            return await self.app(scope, receive, send)
        status = 500
        started = time.perf_counter()
        served = self.served[self.split.pick()]
        scope.setdefault("state", {})[VARIANT] = served.name
        self.metrics.in_flight.inc()
        served.arrivals.open(scope)

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            served.arrivals.close(scope["state"])
            self.metrics.in_flight.dec()
            served.metrics.request_seconds.observe(time.perf_counter() - started)
            if scope["state"].get(READ_TIMED_OUT):  # the protocol answered 408; the app only saw a disconnect
                status = 408
            served.metrics.count(str(status))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the bad field, without echoing the input (it may be huge, or NaN, which JSON cannot carry).

    For a value that may take several forms (an image as PNG text or nested arrays), the deepest error is the
    one that says what is wrong; the names of the alternatives are dropped from the location.
    """
    problems = [{"loc": [str(p) for p in err.get("loc", ()) if not _is_branch(p)], "msg": _message(err)}
                for err in exc.errors()]
    first = max(problems, key=lambda p: len(p["loc"]), default={"loc": [], "msg": "invalid request"})
    message = f"{'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}"
    return JSONResponse({"detail": message, "errors": problems[:20]}, status_code=422)


def _message(err: dict) -> str:
    """pydantic's message, with a bound written as a number (it spells 3.4e38 out in 39 digits)."""
    if err.get("type") in BOUND_ERRORS:
        (bound,) = err["ctx"].values()
        return f"Input should be {BOUND_ERRORS[err['type']]} {bound:.8g}"
    return err.get("msg", "invalid")


def _is_branch(part) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-"))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """500 without details (the traceback goes to the server log), and `Connection: close`, since uvicorn
    closes the connection after an exception: the client then opens a new one instead of meeting a reset."""
    return JSONResponse({"detail": "internal server error"}, status_code=500, headers={"Connection": "close"})


def create_app(loaded: LoadedModel, cfg: ServeConfig, token: str | None = None,
               candidate: LoadedModel | None = None, candidate_weight: float = 0.5) -> FastAPI:
    """The app serving `loaded`; with a `candidate`, a live A/B: each request goes to the candidate ("b") with
    probability `candidate_weight`, else to `loaded` ("a"), and says which in an `X-Model-Variant` header."""
    split = TrafficSplit(candidate_weight if candidate is not None else None)
    metrics = ServeMetrics(split.variants if split.active else ())
    served = {PRIMARY: Served(PRIMARY, loaded, cfg, metrics)}
    if candidate is not None:
        served[CANDIDATE] = Served(CANDIDATE, candidate, cfg, metrics)
    kinds = {s.pre.kind for s in served.values()}
    if len(kinds) > 1:
        raise UserError(f"--ab-model: the two models read different inputs ({' and '.join(sorted(kinds))}); "
                        "an A/B split needs models that answer the same requests")
    pre = served[PRIMARY].pre
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in served.values():
            await model.start()
        state["ready"] = True
        yield
        state["ready"] = False
        for model in served.values():
            await model.batcher.stop()

    shares = {PRIMARY: 1 - candidate_weight, CANDIDATE: candidate_weight}
    described = " and ".join(f"{len(s.loaded.label_names)} labels with {s.loaded.runtime.name}"
                             + (f" as variant {s.name} ({shares[s.name]:.0%} of requests)" if split.active else "")
                             for s in served.values())
    app = FastAPI(title="fullchain ds serve", version="1", lifespan=lifespan,
                  description=f"{pre.kind} classifier: {described}")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.state.drain = lambda: state.update(ready=False)
    request_model = REQUEST_MODELS[pre.kind]

    async def predict(body: request_model, request: Request) -> Response:  # type: ignore[valid-type]
        model = served[request.scope["state"][VARIANT]]
        pre = model.pre
        raw = getattr(body, pre.field)
        try:
            items = await anyio.to_thread.run_sync(pre.encode, raw) if pre.decodes(raw) else pre.encode(raw)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        model.arrivals.close(request.scope["state"])  # from here it waits in the batcher, not on its way to it
        try:
            results = await model.batcher.submit(items)
        except QueueFull:
            raise HTTPException(503, "queue full; retry later",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NonFiniteOutput as exc:
            raise HTTPException(422, f"{pre.field}[{exc.index}]: the model's output is not finite for this input "
                                     "(values far outside the training data?)") from None
        # a plain JSONResponse skips re-validating our own output; the schema stays documented by response_model
        return JSONResponse({"predictions": results}, headers={VARIANT_HEADER: model.name} if split.active else None)

    app.add_api_route(PREDICT_PATH, predict, methods=["POST"], response_model=PredictResponse,
                      summary=f"classify {pre.field}", responses={503: {"description": "queue full"}})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = state["ready"]
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    include_dashboard(app)
    # the middleware added last runs first: metrics (every outcome counted), the token, then the body size
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(PredictMetrics, metrics=metrics, served=served, split=split)
    app.state.metrics = metrics
    return app


def include_dashboard(app: FastAPI) -> None:
    """The monitor's `/dashboard` page (issue 8's `dashboard_router()`), when that module is installed."""
    if importlib.util.find_spec(DASHBOARD_MODULE) is not None:
        from fullchain.monitor.dashboard import dashboard_router  # type: ignore[import-not-found]

        app.include_router(dashboard_router())


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app not ready the moment SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, cfg: ServeConfig, header_timeout_s: float = HEADER_TIMEOUT_S,
                   body_timeout_s: float = BODY_TIMEOUT_S) -> uvicorn.Config:
    protocol = functools.partial(H11WithDeadlines, header_s=header_timeout_s, body_s=body_timeout_s)
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, http=protocol, ws="none", log_level="warning",
                          access_log=False, lifespan="on", timeout_graceful_shutdown=60)


def serve(path: Path, runtime: str | None, cfg: ServeConfig, token_file: Path | None = None, *, insecure: bool = False,
          header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
          trust_code: bool = False, candidate: Path | None = None, candidate_weight: float = 0.5) -> None:
    """Load the model, then serve until SIGTERM/SIGINT; returns after the drain.

    Beyond loopback, a token is required unless `insecure` (an authenticating proxy stands in front).
    `candidate`: a second model answering `candidate_weight` of the requests (live A/B), with the runtime its path
    implies (a ``.onnx`` file with ONNX Runtime)."""
    console = Console(stderr=True)
    token = read_token(token_file)
    check_exposure(cfg.host, token, insecure)
    if candidate is not None:
        check_weight(candidate_weight)  # before minutes of loading
    loaded = load(path, runtime, cfg.threads, trust_code=trust_code)
    second = load(candidate, None, cfg.threads, trust_code=trust_code) if candidate is not None else None
    app = create_app(loaded, cfg, token, second, candidate_weight)
    if token is None and not is_loopback(cfg.host):
        console.print(f"[yellow]warning:[/] --insecure: serving on {cfg.host} without a token; anyone who reaches "
                      "this port can call the model")
    config = uvicorn_config(app, cfg, header_timeout_s, body_timeout_s)
    if second is not None:
        console.print(f"ds serve: A/B split, {1 - candidate_weight:.0%} to {loaded.source} (variant a), "
                      f"{candidate_weight:.0%} to {second.source} with {second.runtime.name} (variant b)",
                      highlight=False)
    console.print(f"ds serve: {loaded.source} with {loaded.runtime.name} on http://{cfg.host}:{cfg.port} "
                  f"(batch <= {cfg.max_batch_size}, wait <= {cfg.max_wait_ms} ms, queue {cfg.queue_size})",
                  highlight=False)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # uvicorn re-raises the signal after its graceful shutdown; a drained server then exits 0, not 143
    signal.signal(signal.SIGTERM, lambda *_: None)
    DrainingServer(config, on_exit=app.state.drain).run()
    console.print("ds serve: drained and stopped", highlight=False)
