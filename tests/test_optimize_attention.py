"""Graph passes on the models people write (issue 14): attention in each common style rewritten to SDPA and exact
on fully masked rows, patterns that must stay, capture through torch.export with an fx fallback and module-by-module
capture, ``transformers`` BERT / GPT-2 / DistilBERT, and the latency guard."""

import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from fullchain.bench import fusion_models
from fullchain.optimize.capture import CaptureError, capture, capture_model
from fullchain.optimize.manager import PassManager, PassRolledBack, replay
from fullchain.optimize.parity import compare
from fullchain.optimize.passes import PASSES, Rewrite, fuse_attention
from fullchain.optimize.passes.common import free_name, op_kind

LONGEST = 96  # the edge inputs' longest length here: long enough to matter, short enough to be fast


def rewriting(passes=("all",)) -> PassManager:
    """No latency guard: these tests are about what the rewrites compute (the guard has its own test)."""
    return PassManager(list(passes), latency_guard=False)


def count(model: nn.Module, kind: str) -> int:
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    return sum(1 for gm in graphs for n in gm.graph.nodes if op_kind(n) == kind)


def assert_same_on(model, optimized, inputs_list):
    """Outputs agree within fp32 tolerance on every input, and NaN exactly where the original has NaN."""
    with torch.no_grad():
        for xs in inputs_list:
            want, got = model(*xs), optimized(*xs)
            for a, b in zip(tree_leaves(want), tree_leaves(got), strict=True):
                assert torch.equal(a.isnan(), b.isnan())
            parity = compare(got, want)
            assert parity.ok, f"max abs error {parity.max_abs:.3g} on input shapes {[tuple(x.shape) for x in xs]}"


# --- every style is rewritten, exactly, fully masked rows included ------------------------------------------


@pytest.mark.parametrize("style", list(fusion_models.STYLES))
def test_each_attention_style_becomes_one_sdpa_call_with_parity_on_edge_rows(style):
    model = fusion_models.build(style)
    example = fusion_models.inputs(style, 2, 24)
    edges = fusion_models.edge_inputs(style, LONGEST)
    optimized, outcomes = rewriting(["fuse_attention"]).run(model, example, probes=edges)
    assert [o.status for o in outcomes] == ["applied"], outcomes[0].error
    assert count(optimized, "sdpa") == 1 and count(optimized, "softmax") == 0
    assert_same_on(model, optimized, [example, *edges])


def test_a_causal_buffer_sliced_to_the_length_becomes_is_causal():
    model = fusion_models.build("gpt2_sliced_causal")
    gm = capture(model, fusion_models.inputs("gpt2_sliced_causal", 2, 24))
    (rewrite,) = fuse_attention(gm)
    (sdpa,) = [n for n in gm.graph.nodes if op_kind(n) == "sdpa"]
    assert sdpa.kwargs["is_causal"] is True and sdpa.kwargs["attn_mask"] is None and "is_causal" in rewrite.detail
    assert not any(n.target is torch.ops.aten.slice.Tensor for n in gm.graph.nodes)  # the mask is gone
    assert_same_on(model, gm, [fusion_models.inputs("gpt2_sliced_causal", 2, 24), *fusion_models.edge_inputs(
        "gpt2_sliced_causal", LONGEST)])


def test_a_graph_slicing_a_buffer_runs_at_the_buffer_s_full_length_and_refuses_longer():
    # nanoGPT's `self.bias[:, :, :T, :T]`: the exporter guards T != 2048 (the slice is not the whole buffer)
    model = fusion_models.build("gpt2_sliced_causal")
    gm = capture(model, fusion_models.inputs("gpt2_sliced_causal", 2, 24))
    assert_same_on(model, gm, [fusion_models.inputs("gpt2_sliced_causal", 1, fusion_models.LONGEST)])
    with pytest.raises(AssertionError, match=f"<= {fusion_models.LONGEST}"):
        gm(*fusion_models.inputs("gpt2_sliced_causal", 1, fusion_models.LONGEST + 1))


def test_a_padding_only_row_keeps_the_original_numbers_for_each_fill_value():
    """masked_fill with a finite fill averages V on an all-masked row, -inf gives NaN: SDPA alone gives zeros."""

    class Filled(nn.Module):
        def __init__(self, fill):
            super().__init__()
            self.fill = fill

        def forward(self, q, k, v, blocked):
            scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(blocked, self.fill)
            return scores.softmax(-1) @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))
    blocked = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    blocked[1] = True  # every key of the second sequence is masked
    blocked[0, ..., 3:] = True
    for fill in (-1e4, torch.finfo(torch.float32).min, float("-inf")):
        model = Filled(fill).eval()
        gm = capture(model, (q, k, v, blocked))
        assert len(fuse_attention(gm)) == 1
        want, got = model(q, k, v, blocked), gm(q, k, v, blocked)
        assert torch.equal(want.isnan(), got.isnan())
        assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=1e-6)
        if math.isfinite(fill):
            assert torch.allclose(got[1], v[1].mean(-2, keepdim=True).expand_as(got[1]), atol=1e-6)
        else:
            assert got[1].isnan().all()


def test_a_small_fill_value_keeps_probability_on_masked_keys_and_is_left_alone():
    class SmallFill(nn.Module):
        def forward(self, q, k, v, blocked):
            return torch.softmax((q @ k.mT).masked_fill(blocked, -5.0), dim=-1) @ v

    q = k = v = torch.randn(1, 2, 4, 8)
    blocked = torch.tensor([False, False, True, True])[None, None, None]
    assert fuse_attention(capture(SmallFill().eval(), (q, k, v, blocked))) == []


class MultiQuery(nn.Module):
    """One K/V head shared by every query head, repeated with ``repeat_interleave``."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * self.dh), nn.Linear(d, d)

    def forward(self, x, keep):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 1, 2 * self.dh).transpose(1, 2).split(self.dh, dim=-1)
        k, v = k.repeat_interleave(self.heads, dim=1), v.repeat_interleave(self.heads, dim=1)
        bias = torch.zeros(b, 1, 1, t).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh) + bias, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, -1))


def test_multi_query_attention_reads_the_shared_head_once_with_enable_gqa():
    torch.manual_seed(0)
    model = MultiQuery().eval()
    x, keep = torch.randn(2, 12, 64), torch.ones(2, 12, dtype=torch.bool)
    keep[1] = False
    optimized, outcomes = rewriting(["fuse_attention"]).run(model, (x, keep))
    assert outcomes[0].status == "applied" and "grouped K/V" in outcomes[0].rewrites[0].detail
    sdpa = [n for m in optimized.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if op_kind(n) == "sdpa"]
    assert len(sdpa) == 1 and sdpa[0].kwargs.get("enable_gqa") is True
    assert_same_on(model, optimized, [(x, keep), (x[:1, :1], keep[:1, :1])])


# --- patterns that must stay as they are --------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Q from the decoder, K and V from the encoder's memory: Q must not be fused with K and V."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, memory):
        b, t, d = x.shape
        split = lambda y: y.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(memory)), split(self.v(memory))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return (probs @ v).transpose(1, 2).reshape(b, t, d)


def test_cross_attention_fuses_only_k_and_v_and_keeps_q_apart():
    torch.manual_seed(0)
    model = CrossAttention().eval()
    inputs = (torch.randn(2, 5, 32), torch.randn(2, 9, 32))
    optimized, outcomes = rewriting().run(model, inputs)
    qkv = next(o for o in outcomes if o.name == "fuse_qkv")
    assert len(qkv.rewrites) == 1 and "(k, v)" in qkv.rewrites[0].detail
    called = {str(n.target) for n in optimized.graph.nodes if n.op == "call_module"}
    assert "q" in called and not {"k", "v"} & called
    assert count(optimized, "sdpa") == 1
    assert_same_on(model, optimized, [inputs])


class SoftmaxOverHeads(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=1) @ v


def test_softmax_over_another_axis_is_left_alone_on_an_exported_graph():
    q = k = v = torch.randn(2, 3, 6, 8)
    gm = capture(SoftmaxOverHeads().eval(), (q, k, v))
    assert fuse_attention(gm) == [] and count(gm, "softmax") == 1


# --- capture ------------------------------------------------------------------------------------------------


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither torch.export nor fx can capture it
            return x
        return -x


class BlockThenGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = fusion_models.ScaleInQuery()
        self.gate = Gate()

    def forward(self, x, keep):
        return self.gate(self.block(x, keep))


def test_a_module_neither_method_captures_is_named_and_the_rest_is_still_optimised():
    model = BlockThenGate().eval()
    inputs = fusion_models.inputs("scale_in_query", 2, 16)
    manager = rewriting()
    optimized, outcomes = manager.run(model, inputs)
    assert manager.captured.graphs == {"block": "export"}
    (failure,) = manager.captured.failures
    assert "module 'gate'" in failure and "test_optimize_attention.py" in failure and "if x.sum() > 0" in failure
    assert {o.name: o.status for o in outcomes}["fuse_attention"] == "applied"
    assert isinstance(optimized.block, fx.GraphModule) and type(optimized.gate) is Gate
    assert type(model.block) is fusion_models.ScaleInQuery  # the model given is untouched
    assert_same_on(model, optimized, [inputs])


def test_when_torch_export_fails_fx_tracing_captures_and_the_passes_still_apply(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("export refused for this test")

    monkeypatch.setattr(torch.export, "export", refuse)
    model = fusion_models.build("einsum_heads_last")
    inputs = fusion_models.inputs("einsum_heads_last", 2, 16)
    manager = rewriting()
    optimized, outcomes = manager.run(model, inputs)
    assert manager.captured.graphs == {"": "fx"}
    assert {o.name: o.status for o in outcomes}["fuse_attention"] == "applied"
    assert_same_on(model, optimized, [inputs])


def test_nothing_capturable_is_one_error_naming_the_module_and_line():
    class OnlyGate(nn.Module):
        def forward(self, x):
            if x.mean() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"cannot capture OnlyGate into a graph: .*if x.mean\(\) > 0"):
        capture_model(OnlyGate(), (torch.randn(3, 4),))


@pytest.mark.parametrize("module", ["multihead_attention", "encoder_layer"])
def test_pytorch_attention_modules_are_captured_whole(module):
    torch.manual_seed(0)
    if module == "multihead_attention":
        mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
        model, inputs = mha, (torch.randn(2, 7, 32),) * 3
    else:
        model, inputs = fusion_models.build("torch_encoder_layer"), fusion_models.inputs("scale_in_query", 2, 7)
    captured = capture_model(model, inputs)
    assert captured.graphs == {"": "export"} and not captured.failures
    assert_same_on(model, captured.module, [inputs])


def test_a_graph_captured_from_a_batch_of_one_serves_any_batch_size():
    # from one row the exporter would specialise the batch to 1 ("Guard failed: x.size()[0] == 1" at batch 64)
    model = fusion_models.build("gpt2_sliced_causal")
    optimized, _ = rewriting().run(model, fusion_models.inputs("gpt2_sliced_causal", 1, 16))
    assert_same_on(model, optimized, [fusion_models.inputs("gpt2_sliced_causal", 5, 16, seed=2)])


def test_exported_graphs_carry_no_capture_device_and_replay_gives_the_same_state_dict_keys():
    model = fusion_models.build("gpt2_sliced_causal")
    inputs = fusion_models.inputs("gpt2_sliced_causal", 2, 16)
    optimized, _ = rewriting().run(model, inputs)
    constants = [a for n in optimized.graph.nodes for a in [*n.args, *n.kwargs.values()]]
    assert not any(isinstance(a, torch.device) for a in constants)  # moves with .to(device)
    rebuilt = replay(fusion_models.build("gpt2_sliced_causal"), ["fuse_qkv", "fuse_attention"],
                     fusion_models.inputs("gpt2_sliced_causal", 3, 20, seed=4))
    assert rebuilt.state_dict().keys() == optimized.state_dict().keys()
    rebuilt.load_state_dict(optimized.state_dict())
    assert_same_on(optimized, rebuilt, [inputs])


# --- transformers models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", pytest.param("hf_distilbert", marks=pytest.mark.slow)])
def test_transformers_models_are_captured_and_every_layer_becomes_sdpa(name):
    model = fusion_models.hf_model(name, layers=2)
    example = fusion_models.inputs(name, 2, 20)
    edges = fusion_models.edge_inputs(name, LONGEST)
    manager = rewriting()
    optimized, outcomes = manager.run(model, example, probes=edges)
    status = {o.name: (o.status, len(o.rewrites)) for o in outcomes}
    assert manager.captured.graphs == {"": "export"}
    assert status["fuse_attention"] == ("applied", 2)
    if name != "hf_gpt2":  # GPT-2 computes Q, K and V with one Conv1D already
        assert status["fuse_qkv"] == ("applied", 2)
    assert count(optimized, "sdpa") == 2 and count(optimized, "softmax") == 0
    assert_same_on(model, optimized, [example, *edges])


# --- the latency guard --------------------------------------------------------------------------------------


class Sleepy(nn.Module):
    """Wraps a module and sleeps 30 ms per call: a rewrite that makes the model far slower, deterministically (a
    tiny model's call takes about 0.5 ms, and a sleep cannot be shortened by a busy machine)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        time.sleep(0.03)
        return self.inner(x)


def slow_down(gm):
    path = next(n.target for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), nn.Linear))
    name = free_name(gm, "sleepy")
    gm.add_submodule(name, Sleepy(gm.get_submodule(path)))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path:
            node.target = name
    gm.recompile()
    return [Rewrite("slow_down", path, "wrapped in a 30 ms sleep")]


def test_a_pass_that_slows_the_model_is_rolled_back_and_the_outcome_says_so(monkeypatch):
    monkeypatch.setitem(PASSES, "slow_down", slow_down)
    model = fusion_models.build("scale_in_query")
    inputs = fusion_models.inputs("scale_in_query", 2, 8)
    with pytest.warns(PassRolledBack, match=r"slow_down: rolled back \(.*x the latency before it"):
        optimized, outcomes = PassManager(["slow_down"], rounds=3).run(model, inputs)
    (outcome,) = outcomes
    assert outcome.status == "rolled-back" and outcome.reason == "slower"
    assert outcome.parity.ok and outcome.latency.ratio > 1.1 and outcome.latency.rounds >= 3
    assert outcome.to_json()["latency"]["threads"] == torch.get_num_threads()
    assert not any(isinstance(m, Sleepy) for m in optimized.modules())


def test_a_clean_run_with_the_guard_on_warns_only_about_speed_if_at_all():
    model = fusion_models.build("bert_finfo_mask")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PassRolledBack)
        optimized, outcomes = PassManager(["all"], rounds=3).run(model, fusion_models.inputs("bert_finfo_mask", 2, 16))
    assert all(o.reason in (None, "slower") for o in outcomes)  # never parity or an error
    assert all("the latency before it" in str(w.message) for w in caught)
    assert all(o.latency is not None for o in outcomes if o.rewrites)
