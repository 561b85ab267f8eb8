"""Hugging Face models through the whole chain, as a user runs it: `ds run` with ``model: {hf: DIR}`` trains,
evaluates, exports (ONNX parity) and serves a tiny BERT, a tiny GPT-2 and a tiny sentence-embedding BERT
(mean pooling), on a slice of BBC News, in real processes.

The checkpoints are random-weight models written by transformers itself (`hf_support`), with tokenizers trained
on BBC News so the texts are real tokens, not unknowns. Each is run once per module; the tests then read what the
run left: summary.json, the artifact (also an ordinary Hugging Face checkpoint), `ds evaluate` on the directory
and on its model.onnx, and a `ds serve` of it answering like the model itself, whatever the padding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from fullchain.artifact import LoadedModel, load
from fullchain.config import load_config
from fullchain.data.text import read_bbc_news
from fullchain.deploy.process import ServerProcess
from fullchain.models.hf.quiet import quiet_transformers
from fullchain.stages.train import train_stage
from fullchain.tasks.classification import TOKENS
from hf_support import MAX_POSITIONS, bert_source, gpt2_source, sentence_source

DS = [sys.executable, "-m", "fullchain.cli"]
SOURCES: dict[str, Callable[..., Path]] = {"bert": bert_source, "gpt2": gpt2_source, "sbert": sentence_source}
ARCHITECTURES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
                 "sbert": "BertModel"}
MAX_LENGTH = 48
slow = pytest.mark.slow  # three `ds run`s side by side, then what they left: 1-2 minutes on 2 shared cores


def ds(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*DS, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def side_by_side(commands: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Each `ds` command line in its own process, all at once (most of a short run is importing on one core)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        done = {key: pool.submit(ds, *args) for key, args in commands.items()}
        return {key: future.result() for key, future in done.items()}


def run_file(directory: Path, name: str, source: Path, **sections) -> Path:
    """A run file training the checkpoint at ``source`` on 200 BBC News articles; ``sections`` update its sections."""
    raw = {"name": name, "runs_dir": str(directory / "runs"), "seed": 0, "model": {"hf": str(source)},
           "data": {"name": "bbc_news", "max_samples": 200, "tokenizer": {"max_length": MAX_LENGTH}},
           "train": {"max_steps": 12, "batch_size": 16, "precision": "bf16", "progress": False,
                     "tensorboard": False, "optimizer": {"lr": 0.003}},
           "checkpoint": {"enabled": False}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return read_bbc_news()[0]


@pytest.fixture(scope="module")
def sources(articles, tmp_path_factory) -> dict[str, Path]:
    """The three tiny checkpoints, tokenizers (1,000 entries) trained on every fifth BBC article."""
    root = tmp_path_factory.mktemp("hf_sources")
    torch.manual_seed(0)
    return {kind: build(root / kind, articles[::5], vocab_size=1000) for kind, build in SOURCES.items()}


# --- the whole chain: ds run, then what it left --------------------------------------------------------------


@dataclass
class ChainRun:
    process: subprocess.CompletedProcess
    run_dir: Path

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def chains(sources, tmp_path_factory) -> dict[str, ChainRun]:
    """`ds run` of each tiny checkpoint: train, evaluate, export and a one-second serve-and-load check."""
    root = tmp_path_factory.mktemp("chains")
    files = {kind: run_file(root, kind, source, export={"enabled": True},
                            serve={"enabled": True, "load_seconds": 1, "load_concurrency": 4})
             for kind, source in sources.items()}
    done = side_by_side({kind: ("run", path) for kind, path in files.items()})
    return {kind: ChainRun(done[kind], root / "runs" / kind) for kind in files}


@slow
@pytest.mark.parametrize("kind", SOURCES)
def test_ds_run_trains_evaluates_exports_and_serves(chains, kind):
    chain = chains[kind]
    assert chain.process.returncode == 0, chain.process.stderr[-3000:]
    assert "Traceback" not in chain.process.stderr
    summary = chain.summary
    assert summary["failed_stages"] == []
    assert summary["train"]["steps"] == 12
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and summary["eval"]["n"] > 0
    assert 0.0 <= summary["eval"]["baselines"]["tfidf_logreg"]["accuracy"] <= 1.0
    assert summary["export"]["parity_ok"] is True
    assert Path(summary["export"]["path"]) == chain.model_dir / "model.onnx"
    statuses = summary["serve"]["statuses"]
    assert set(statuses) == {"200"} and statuses["200"] > 0
    assert summary["serve"]["drained_on_sigterm"] is True


def model_inputs(loaded: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """The texts as the framework batches them (right padding), through the artifact's own encoder."""
    return loaded.task.model_inputs(loaded.task.collate([{TOKENS: ids} for ids in loaded.encoder.encode(texts)]))


@slow
@pytest.mark.parametrize("kind", SOURCES)
def test_the_artifact_is_an_ordinary_hugging_face_checkpoint(chains, kind, articles):
    """transformers loads the artifact directory by itself, with the head form fullchain trained: the
    architecture's own head (BERT, GPT-2), or mean pooling and a linear head for the sentence-embedding model."""
    model_dir = chains[kind].model_dir
    loaded = load(model_dir, runtime="torch")
    assert loaded.meta.builder == {"hf": ARCHITECTURES[kind]}
    input_ids, attention_mask = model_inputs(loaded, [articles[0], "Shares rose.", articles[1]])
    assert (attention_mask == 0).any()  # the batch is padded
    ours = torch.from_numpy(loaded.runtime(input_ids, attention_mask))
    with quiet_transformers(), torch.no_grad():
        if kind == "sbert":
            assert loaded.meta.args["pooling"] == "mean"
            body = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
            states = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            keep = attention_mask.unsqueeze(-1).float()
            head = load_file(model_dir / "model.safetensors")
            theirs = ((states * keep).sum(1) / keep.sum(1)) @ head["classifier.weight"].T + head["classifier.bias"]
        else:
            assert loaded.meta.args["pooling"] == "head"
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
            assert type(model).__name__ == ARCHITECTURES[kind]
            assert model.config.id2label == dict(enumerate(loaded.label_names))
            theirs = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def evaluations(chains) -> dict[str, subprocess.CompletedProcess]:
    """`ds evaluate --json` of each artifact directory ("<kind>") and of its model.onnx ("<kind>.onnx")."""
    targets = {**{kind: chain.model_dir for kind, chain in chains.items()},
               **{f"{kind}.onnx": chain.model_dir / "model.onnx" for kind, chain in chains.items()}}
    out = {key: target.parent / f"eval-{key}.json" for key, target in targets.items()}
    done = side_by_side({key: ("evaluate", target, "--json", out[key]) for key, target in targets.items()})
    failed = {key: process.stderr[-2000:] for key, process in done.items() if process.returncode != 0}
    assert not failed, failed
    return {key: json.loads(path.read_text()) for key, path in out.items()}


@slow
@pytest.mark.parametrize("kind", SOURCES)
def test_ds_evaluate_scores_the_directory_and_its_onnx_file_alike(chains, evaluations, kind):
    """The .onnx file finds model.json and the tokenizer beside it and scores like the torch model."""
    directory, onnx = evaluations[kind], evaluations[f"{kind}.onnx"]
    assert directory["n"] == onnx["n"] == chains[kind].summary["eval"]["n"]
    assert onnx["accuracy"] == pytest.approx(directory["accuracy"], abs=1e-6)
    assert directory["accuracy"] == pytest.approx(chains[kind].summary["eval"]["accuracy"], abs=1e-6)
    assert onnx["loss"] == pytest.approx(directory["loss"], abs=1e-4)


@pytest.fixture(scope="module")
def servers(chains, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """`ds serve` of each artifact (torch), started side by side; each must drain cleanly on SIGTERM."""
    logs = tmp_path_factory.mktemp("serve_logs")
    servers = {kind: ServerProcess(["serve", str(chain.model_dir), "--max-wait-ms", "20"], log=logs / f"{kind}.log")
               for kind, chain in chains.items()}
    try:
        for server in servers.values():
            server.launch()
        yield {kind: server.wait_ready() for kind, server in servers.items()}
    finally:
        codes = {kind: server.stop() for kind, server in servers.items()}
    assert codes == dict.fromkeys(servers, 0), {kind: (logs / f"{kind}.log").read_text()[-2000:] for kind in codes}


@slow
@pytest.mark.parametrize("kind", SOURCES)
def test_served_predictions_equal_the_models_and_do_not_depend_on_padding(chains, servers, kind, articles):
    """Texts of very different lengths in one request (one padded batch) get the labels and scores each gets
    alone, and those equal the artifact's own torch model (GPT-2 reads the last token that is not padding)."""
    texts = [articles[2], articles[2].partition("\n")[0], "Oil.", " ".join(articles[3].split()[:8])]
    loaded = load(chains[kind].model_dir, runtime="torch")
    lengths = [len(ids) for ids in loaded.encoder.encode(texts)]
    assert len(set(lengths)) >= 3 and max(lengths) == MAX_LENGTH
    expected = [loaded.task.postprocess(loaded.runtime(*model_inputs(loaded, [text])))[0] for text in texts]

    url = servers[kind].url + "/v1/predict"
    together = httpx.post(url, json={"texts": texts}, timeout=30)
    alone = [httpx.post(url, json={"texts": [text]}, timeout=30) for text in texts]
    assert together.status_code == 200 and all(r.status_code == 200 for r in alone)
    for got in (together.json()["predictions"], [r.json()["predictions"][0] for r in alone]):
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-5)


# --- resume ----------------------------------------------------------------------------------------------------


def test_a_stopped_gpt2_run_resumes_to_bit_identical_weights(sources, tmp_path):
    """GPT-2 (dropout on, a second parameter group for its new head): 5 of 12 steps (`--set train.max_steps=5`),
    then `--resume auto` to the end, equals 12 steps in one go, tensor for tensor."""
    settings = {"train": {"schedule": {"kind": "constant"}}, "checkpoint": {"enabled": True, "every_steps": 2}}
    whole = run_file(tmp_path / "whole", "r", sources["gpt2"], **settings)
    parts = run_file(tmp_path / "parts", "r", sources["gpt2"], **settings)
    train_stage(load_config(whole))
    assert train_stage(load_config(parts, ["train.max_steps=5"])).result.steps == 5
    resumed = train_stage(load_config(parts), resume="auto").result
    assert resumed.resumed_from_step == 5 and resumed.steps == 12

    reference = load_file(tmp_path / "whole" / "runs" / "r" / "model" / "model.safetensors")
    result = load_file(tmp_path / "parts" / "runs" / "r" / "model" / "model.safetensors")
    assert reference.keys() == result.keys()
    for key, tensor in reference.items():
        assert torch.equal(tensor, result[key]), key


# --- refusals: one line, exit code 2 ---------------------------------------------------------------------------


def _with_custom_code(source: Path, directory: Path) -> Path:
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_mine.MyClassifier"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


REFUSALS = {  # run file sections, and what the one line says
    "auto_map": ({}, "'auto_map' names custom model code"),
    "tokenizer_kind": ({"data": {"tokenizer": {"kind": "bpe"}}}, "data.tokenizer: kind cannot be set with model.hf"),
    "model_args": ({"model": {"args": {"dropout": 0.1}}}, "model.args: dropout cannot be set for a pretrained model"),
    "max_length": ({"data": {"tokenizer": {"max_length": MAX_POSITIONS + 1}}},
                   f"max_length {MAX_POSITIONS + 1} is longer than the {MAX_POSITIONS} positions"),
    "image_data": ({"data": {"name": "digits"}}, "model.hf classifies text, but data 'digits' is image data"),
}


@pytest.fixture(scope="module")
def refusals(sources, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """`ds run` of each refused run file (a GPT-2 source), side by side; the root holds one folder per case."""
    root = tmp_path_factory.mktemp("refusals")
    custom = _with_custom_code(sources["gpt2"], root / "custom_code_model")
    files = {case: run_file(root / case, "refused", custom if case == "auto_map" else sources["gpt2"], **sections)
             for case, (sections, _) in REFUSALS.items()}
    return root, side_by_side({case: ("run", path) for case, path in files.items()})


@pytest.mark.parametrize("case", REFUSALS)
def test_what_a_pretrained_model_cannot_do_is_refused_in_one_line(refusals, case):
    root, done = refusals
    result, message = done[case], REFUSALS[case][1]
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (root / case / "runs" / "refused" / "model").exists()
