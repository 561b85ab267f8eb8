"""The LitServe contender of `ds bench serve`: the same artifact, runtime and preprocessing behind LitServe.

LitServe batches on its own (up to `max_batch_size` requests within `batch_timeout`) in an inference worker
process; its API class lives here, at module level, because LitServe pickles it into that process.
"""

import signal
import sys

import litserve as ls

from fullchain.artifact import load
from fullchain.deploy.preprocess import Preprocessor
from fullchain.deploy.server import SWITCH_INTERVAL_S


class ModelAPI(ls.LitAPI):
    """One request: `{"<input field>": [item, ...]}` -> `{"predictions": [...]}`, as `ds serve` answers."""

    def __init__(self, model: str, runtime: str | None, **batching):
        super().__init__(**batching)
        self.model_path, self.runtime_name = model, runtime

    def setup(self, device):
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # the interpreter setting `ds serve` runs with, in this process too
        self.loaded = load(self.model_path, self.runtime_name)
        self.pre = Preprocessor(self.loaded)

    def decode_request(self, request):
        return self.pre.encode(request[self.pre.field])

    def batch(self, inputs):  # a request may carry several items: keep them apart for unbatch
        return inputs

    def predict(self, requests):
        items = [item for request in requests for item in request]
        predictions = self.loaded.task.postprocess(self.loaded.runtime(*self.pre.collate(items)))
        out, start = [], 0
        for request in requests:
            out.append(predictions[start:start + len(request)])
            start += len(request)
        return out

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"predictions": output}


def serve(model: str, runtime: str | None, port: int, accelerator: str, max_batch_size: int,
          max_wait_ms: float) -> None:
    api = ModelAPI(model, runtime, max_batch_size=max_batch_size, batch_timeout=max_wait_ms / 1000,
                   api_path="/v1/predict")
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=30)
    # LitServer.run shuts its worker processes down on KeyboardInterrupt; SIGTERM (how the bench stops a
    # server) would otherwise end only this process and leave the workers running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)
