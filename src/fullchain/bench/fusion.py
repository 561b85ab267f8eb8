"""Graph passes for inference: eager against passes, passes + torch.compile and torch.compile alone.

Models: the Transformer encoder classifier at a small shape and at a BERT-base-like shape (12 layers,
768 wide, 12 heads), sequences of 128 / 512 / 2048 tokens at batch 1 and 8, and the ResNet-style CNN
on 28x28 images (on CUDA, within the GPU suite's time box: the small model at 1024 tokens, BERT-base at batch
8 with 512 and 2048 tokens, the CNN at batch 64). Beside them, models from outside our code
(`fullchain.bench.fusion_models`): ``transformers`` BERT, GPT-2 and DistilBERT (small configs, random weights),
``nn.TransformerEncoderLayer``, and attention written in the styles users write (GPT-2's sliced causal
buffer, BERT's finfo mask, baddbmm on 3-D tensors, einsum with heads last, T5's fp32 softmax with a position
bias, the scale folded into Q, grouped-query attention), at batch 1 with 128 / 512 / 2048 tokens.

Per model the record says whether it was captured (and how), which passes applied (the latency guard may roll
one back), how many attention blocks became SDPA calls, and parity on edge inputs (a padding-only row, one
token, the longest length; NaN positions must match). Each shape is measured on its own: the contenders are
built (and, for the compiled ones, compiled for that shape, compile time reported apart), warmed up,
then timed call by call in rotating order; peak memory is the extra memory at the peak of one call
(`fullchain.optimize.measure`), and every contender's outputs are compared with eager's. On CUDA
everything runs in fp16 (the design's claim is about FP16 inference on GPU); on CPU in fp32.

Weights are randomly initialised (no pretrained BERT is available offline) and timed inputs are full-length
sequences without padding: latency and memory do not depend on the values, and full length is attention's
worst case. ``--quick`` keeps the small Transformer (128 and 1024 tokens, batch 1) and the CNN, eager against
passes only, and checks capture, rewrites and edge parity of the ``transformers`` BERT and GPT-2 (untimed).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fullchain.bench import fusion_models
from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.distributed.strategy import resolve_device
from fullchain.models import build_model
from fullchain.optimize.manager import PassManager, PassRolledBack
from fullchain.optimize.measure import peak_memory_bytes, synchronize
from fullchain.optimize.parity import TOLERANCES, compare
from fullchain.optimize.passes.common import op_kind
from fullchain.optimize.recipe import cast_inputs

TRANSFORMERS = {
    "small": {"d_model": 256, "n_heads": 4, "n_layers": 4, "d_ff": 1024},
    "bert_base": {"d_model": 768, "n_heads": 12, "n_layers": 12, "d_ff": 3072},
}
VOCAB = 30522  # BERT's vocabulary size
# BERT-base at 2048 tokens x 8 sequences is ~4 TFLOP per call (~1 min on two CPU cores): measured on GPU only.
CPU_SKIP = {("bert_base", 8, 2048)}
SLOW_CALL_MS = 1000.0  # shapes whose eager call takes longer get 3 timed rounds instead of the default
QUICK_EXTERNAL = ("hf_bert", "hf_gpt2")
EXTERNAL_LENGTHS = (128, 512, 2048)


@dataclass(frozen=True)
class Case:
    model: str  # "small", "bert_base", "cnn" or a name in fusion_models.EXTERNAL
    batch: int
    length: int  # tokens, or image side for the CNN

    @property
    def key(self) -> str:
        return f"{self.model}/b{self.batch}/" + (f"{self.length}px" if self.model == "cnn" else f"t{self.length}")


def _cases(quick: bool, cuda: bool) -> list[Case]:
    if quick:
        return [Case("small", 1, 128), Case("small", 1, 1024), Case("cnn", 8, 28)]
    if cuda:  # the GPU suite's time box: the claim's shapes only
        cases = [Case("small", 1, 1024), Case("bert_base", 8, 512), Case("bert_base", 8, 2048), Case("cnn", 64, 28)]
    else:
        cases = [Case(m, b, t) for m in TRANSFORMERS for b in (1, 8) for t in (128, 512, 2048)]
        cases += [Case("cnn", 1, 28), Case("cnn", 64, 28)]
    cases += [Case(m, 1, t) for m in fusion_models.EXTERNAL for t in EXTERNAL_LENGTHS]
    return [c for c in cases if (c.model, c.batch, c.length) not in CPU_SKIP]


def _model(name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if name in fusion_models.EXTERNAL:
        model = fusion_models.build(name)
    elif name == "cnn":
        model = build_model(name="cnn", args={"num_classes": 10, "channels": 1})
        for m in model.modules():  # trained-looking BatchNorm statistics, so folding has work to do
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    else:
        model = build_model(name="transformer", args={**TRANSFORMERS[name], "vocab_size": VOCAB, "num_classes": 4,
                                                      "max_length": 2048, "dropout": 0.1})
    return model.eval().to(device=device, dtype=dtype)


def _inputs(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(case.batch * 10_000 + case.length)
    if case.model in fusion_models.EXTERNAL:
        xs = fusion_models.inputs(case.model, case.batch, case.length, seed=case.length)
        if case.batch == 1 or case.length > 64:  # timed shapes: full length, nothing padded
            xs = (xs[0], torch.ones_like(xs[1]))
    elif case.model == "cnn":
        xs = (torch.randn(case.batch, 1, case.length, case.length, generator=g),)
    else:
        xs = (torch.randint(1, VOCAB, (case.batch, case.length), generator=g),)
    return tuple(cast_inputs(x, dtype).to(device) for x in xs)


def _edge_inputs(name: str, longest: int, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """A padding-only row beside a full one, one token, the longest length (CNN: a single image)."""
    if name == "cnn":
        edges = [(torch.randn(1, 1, 28, 28),)]
    elif name in fusion_models.EXTERNAL:
        edges = fusion_models.edge_inputs(name, longest)
    else:
        ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
        ids[1] = 0  # all padding
        edges = [(ids,), (ids[:1, :1],), (torch.randint(1, VOCAB, (1, longest)),)]
    return [tuple(cast_inputs(x, dtype).to(device) for x in xs) for xs in edges]


def _compiled(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[Callable, float]:
    """``torch.compile`` for one static shape; returns the callable and its compile time (first call)."""
    fn = torch.compile(model, dynamic=False)
    started = time.perf_counter()
    with torch.inference_mode():
        fn(*example)
    synchronize(example[0].device)
    return fn, time.perf_counter() - started


def _timed(fn: Callable, x: tuple[torch.Tensor, ...]) -> Callable[[], dict[str, float]]:
    def call() -> dict[str, float]:
        started = time.perf_counter()
        with torch.inference_mode():
            fn(*x)
        synchronize(x[0].device)
        return {"latency_ms": (time.perf_counter() - started) * 1e3}

    return call


def _measure_case(case: Case, contenders: list[str], dtype: torch.dtype, device: torch.device, repeats: int,
                  optimized: dict[str, nn.Module], eager_models: dict[str, nn.Module]) -> tuple[dict, dict]:
    """Latency rounds, peak memory and parity of every contender at one shape."""
    x = _inputs(case, device, dtype)
    eager = eager_models[case.model]
    torch._dynamo.reset()
    fns: dict[str, Callable] = {"eager": eager, "passes": optimized[case.model]}
    compile_s = {}
    if "passes+compile" in contenders:
        fns["passes+compile"], compile_s["passes+compile"] = _compiled(optimized[case.model], x)
    if "compile" in contenders:
        fns["compile"], compile_s["compile"] = _compiled(eager, x)
    if _timed(eager, x)()["latency_ms"] > SLOW_CALL_MS:
        repeats = min(repeats, 3)
    rounds = alternate({name: _timed(fns[name], x) for name in contenders}, repeats=repeats, warmup=1)
    with torch.inference_mode():
        reference = eager(*x)
        extra = {}
        for name in contenders:
            parity = compare(fns[name](*x), reference, dtype)
            extra[name] = {
                "peak_memory_mb": _mb(peak_memory_bytes(lambda fn=fns[name]: fn(*x), device)),
                "max_abs_error": parity.max_abs,
                "parity_ok": parity.ok,
            }
            if name in compile_s:
                extra[name]["compile_s"] = round(compile_s[name], 2)
    return rounds, extra


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 2)


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fullchain" / "inductor"))
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    contenders = ["eager", "passes"] if quick else ["eager", "passes", "passes+compile", "compile"]
    cases = _cases(quick, cuda)
    repeats = 5

    timed_models = list(dict.fromkeys(c.model for c in cases))
    untimed = [m for m in QUICK_EXTERNAL if quick and m not in timed_models]
    eager_models, optimized, applied, rewrites = {}, {}, {}, {}
    for name in timed_models + untimed:
        eager_models[name] = _model(name, dtype, dev)
        own = sorted((c for c in cases if c.model == name), key=lambda c: c.length)
        timing = (own[0] if quick else own[-1]) if own else None  # the latency guard's shape
        optimized[name], rewrites[name] = _optimise(name, eager_models[name], timing, quick, dtype, dev)
        applied[name] = rewrites[name]["passes"]
    for name in untimed:
        del eager_models[name], optimized[name]

    results: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    parity_ok = True
    for case in cases:
        rounds, extra = _measure_case(case, contenders, dtype, dev, repeats, optimized, eager_models)
        summary = summarise(rounds)
        for name in contenders:
            results[f"{case.key}/{name}"] = {**summary[name], **extra[name]}
            parity_ok = parity_ok and extra[name]["parity_ok"]
        eager_ms = [r["latency_ms"] for r in rounds["eager"]]
        for name in contenders[1:]:
            paired = [e / r["latency_ms"] for e, r in zip(eager_ms, rounds[name], strict=True)]
            ratios[f"{case.key}/{name}_vs_eager_latency"] = round(statistics.median(paired), 3)
            eager_mem, mem = extra["eager"]["peak_memory_mb"], extra[name]["peak_memory_mb"]
            if eager_mem and mem is not None:
                ratios[f"{case.key}/{name}_vs_eager_peak_memory"] = round(mem / eager_mem, 3)
        if "compile" in contenders:
            ratios[f"{case.key}/passes+compile_vs_compile_latency"] = round(
                statistics.median(c["latency_ms"] / p["latency_ms"]
                                  for c, p in zip(rounds["compile"], rounds["passes+compile"], strict=True)), 3)

    edge_ok = all(r["edge_parity_ok"] for r in rewrites.values())
    results.update({f"{name}/rewrite": row for name, row in rewrites.items()})
    record = BenchRecord(
        bench="fusion",
        settings={
            "quick": quick, "dtype": str(dtype).removeprefix("torch."), "device": str(dev), "repeats": repeats,
            "transformers": {k: v for k, v in TRANSFORMERS.items() if any(c.model == k for c in cases)},
            "cases": [c.key for c in cases], "contenders": contenders, "passes_applied": applied,
            "inputs": "random-init weights; full-length token ids (no padding); CNN: unit-normal 28x28 images; "
                      "edge parity: a padding-only row, one token, the longest length",
            "threads": torch.get_num_threads(),
        },
        results=results,
        ratios=ratios,
    )
    longest = max((c for c in cases if c.model == "small" and c.batch == 1), key=lambda c: c.length)
    record.ratios["passes_vs_eager_latency"] = ratios[f"{longest.key}/passes_vs_eager_latency"]
    if f"{longest.key}/passes_vs_eager_peak_memory" in ratios:
        record.ratios["passes_vs_eager_peak_memory"] = ratios[f"{longest.key}/passes_vs_eager_peak_memory"]
    record.checks["parity"] = parity_ok and edge_ok
    hf = [name for name in rewrites if name in fusion_models.HF_MODELS]
    record.checks["hf_models_rewritten"] = bool(hf) and all(
        rewrites[n]["captured"] and rewrites[n]["sdpa_calls"] == rewrites[n]["attention_blocks"] > 0
        and rewrites[n]["edge_parity_ok"] for n in hf)
    styles = [name for name in rewrites if name in fusion_models.STYLES]
    if styles:
        record.checks["styles_rewritten"] = all(rewrites[n]["sdpa_calls"] == 1 and rewrites[n]["edge_parity_ok"]
                                                for n in styles)
    record.notes.append(f"headline ratios at {longest.key}, the longest sequence of the small model at batch 1")
    if not quick:
        _goals(record, cases)
    if not cuda and not quick:
        record.notes.append("not measured on CPU: " + ", ".join(f"{m}/b{b}/t{t}" for m, b, t in sorted(CPU_SKIP)))
    return record


def _count_ops(model: nn.Module, kind: str) -> int:
    """SDPA calls or softmaxes left in the captured graphs of ``model``."""
    graphs = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    return sum(1 for gm in graphs for n in gm.graph.nodes if op_kind(n) == kind)


def _optimise(name: str, model: nn.Module, timed: Case | None, quick: bool, dtype: torch.dtype,
              device: torch.device) -> tuple[nn.Module, dict]:
    """All passes with edge-input parity and, for timed models, the latency guard at shape ``timed``
    (the longest, or with ``quick`` the shortest timed shape); returns what happened."""
    example = _inputs(Case(name, 2, 28 if name == "cnn" else 64), device, dtype)
    edges = _edge_inputs(name, 256 if quick else fusion_models.LONGEST, device, dtype)
    manager = PassManager(["all"], tolerance=TOLERANCES[dtype], latency_guard=timed is not None)
    timing = _inputs(timed, device, dtype) if timed is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PassRolledBack)
        optimized, outcomes = manager.run(model, example, probes=edges, timing_inputs=timing)
    with torch.inference_mode():
        parities = [compare(optimized(*xs), model(*xs), dtype) for xs in [example, *edges]]
    captured = manager.captured
    return optimized, {
        "captured": bool(captured.graphs), "capture": captured.to_json(),
        "passes": {o.name: len(o.rewrites) for o in outcomes if o.status == "applied"},
        "rolled_back": {o.name: o.reason for o in outcomes if o.status == "rolled-back"},
        "attention_blocks": _count_ops(optimized, "softmax") + _count_ops(optimized, "sdpa"),
        "sdpa_calls": _count_ops(optimized, "sdpa"),
        "edge_parity_ok": all(p.ok for p in parities),
        "edge_max_abs_error": max(p.max_abs for p in parities),
    }


def _goals(record: BenchRecord, cases: list[Case]) -> None:
    """The issue's CPU goals, evaluated on the BERT-base-like shape at batch 1."""
    r = record.ratios
    base = "bert_base/b1"
    if f"{base}/t512/passes+compile_vs_eager_latency" in r:
        r["goal_passes_compile_vs_eager_latency_t512"] = r[f"{base}/t512/passes+compile_vs_eager_latency"]
        record.checks["goal_passes_compile_1.3x_at_512"] = r["goal_passes_compile_vs_eager_latency_t512"] >= 1.3
    if f"{base}/t2048/passes+compile_vs_eager_peak_memory" in r:
        r["goal_passes_compile_vs_eager_peak_memory_t2048"] = r[f"{base}/t2048/passes+compile_vs_eager_peak_memory"]
        record.checks["goal_28pct_less_memory_at_2048"] = r["goal_passes_compile_vs_eager_peak_memory_t2048"] <= 0.72
    external = [v for k, v in r.items() if k.split("/")[0] in fusion_models.EXTERNAL
                and k.endswith("/passes_vs_eager_latency")]
    if external:  # the goal: passes never make a model from outside our code slower than eager
        r["worst_external_passes_vs_eager_latency"] = min(external)
        record.checks["external_never_5pct_slower_than_eager"] = min(external) >= 0.95
    worst = min((v for k, v in r.items() if k.endswith("passes+compile_vs_compile_latency")), default=None)
    if worst is not None:
        r["worst_passes_compile_vs_compile_latency"] = worst
        record.checks["never_5pct_slower_than_compile_alone"] = worst >= 0.95
