"""Reference models and the builder registry (fullchain.models)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fullchain.errors import UserError
from fullchain.models import (
    MLP,
    MODELS,
    PAD_ID,
    RESNET_PRESETS,
    CausalLM,
    ResNetCNN,
    SelfAttention,
    TransformerClassifier,
    build_model,
    count_parameters,
    model_args_from_data,
)

VOCAB = 50


def small_transformer(**kw) -> TransformerClassifier:
    args = dict(vocab_size=VOCAB, num_classes=3, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_length=32)
    return TransformerClassifier(**(args | kw))


def small_lm(**kw) -> CausalLM:
    args = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_length=32)
    return CausalLM(**(args | kw))


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)  # no padding


def check_backward(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_pad_id_matches_data():
    from fullchain.data.bundle import PAD_ID as DATA_PAD_ID

    assert PAD_ID == DATA_PAD_ID


def test_registry_names():
    assert set(MODELS) == {"mlp", "cnn", "transformer", "causal_lm"}


# ---- MLP ----

def test_mlp_shapes_backward_and_images():
    torch.manual_seed(0)
    m = MLP(num_features=12, num_classes=4)
    assert m(torch.randn(5, 12)).shape == (5, 4)
    check_backward(m, torch.randn(5, 12))
    img = MLP(num_features=1 * 8 * 8, num_classes=3, hidden=[16])
    assert img(torch.randn(2, 1, 8, 8)).shape == (2, 3)


# ---- CNN ----

def test_cnn_shapes_and_backward():
    torch.manual_seed(0)
    m = ResNetCNN(num_classes=10)
    x = torch.randn(4, 1, 28, 28)
    assert m(x).shape == (4, 10)
    check_backward(m, x)
    rgb = ResNetCNN(num_classes=5, channels=3, widths=[16, 32], blocks_per_stage=[2, 1], block="bottleneck")
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_cnn_blocks_use_separate_conv_bn_relu_modules():
    m = ResNetCNN(num_classes=10)
    block = m.stages[1][0]
    assert isinstance(block.conv1, nn.Conv2d) and block.conv1.bias is None
    assert isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.relu1, nn.ReLU)
    assert block.relu1 is not block.relu2
    assert isinstance(block.shortcut[0], nn.Conv2d)  # width changes 32 -> 64: projection shortcut
    assert isinstance(m.stages[0][0].shortcut, nn.Identity)


def test_cnn_bf16_autocast_cpu_is_finite():
    torch.manual_seed(0)
    m = ResNetCNN(num_classes=10).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert torch.isfinite(out.float()).all()


def test_resnet50_sized_config_parameter_count():
    m = ResNetCNN(num_classes=1000, **RESNET_PRESETS["resnet50"])
    n = count_parameters(m)
    assert 23e6 <= n <= 26e6
    assert n == 25_557_032  # torchvision.models.resnet50


# ---- Transformer classifier ----

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_shapes_and_backward(pooling):
    torch.manual_seed(0)
    m = small_transformer(pooling=pooling)
    x = tokens(3, 10)
    x[0, 6:] = PAD_ID
    assert m(x).shape == (3, 3)
    check_backward(m, x)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformer_padding_invariance(pooling):
    torch.manual_seed(0)
    m = small_transformer(pooling=pooling).eval()
    x = tokens(2, 7)
    padded = torch.cat([x, torch.full((2, 5), PAD_ID)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(m(padded), m(x), atol=1e-5, rtol=0)


def test_transformer_all_padding_row_is_finite():
    torch.manual_seed(0)
    m = small_transformer().eval()
    x = tokens(2, 6)
    x[1] = PAD_ID
    out = m(x)
    assert torch.isfinite(out).all()
    m.train()
    check_backward(m, x)


def test_transformer_bf16_autocast_cpu():
    torch.manual_seed(0)
    m = small_transformer().eval()
    x = tokens(2, 8)
    x[0, 4:] = PAD_ID
    x[1] = PAD_ID
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out[0].float(), m(x)[0], atol=0.05, rtol=0.05)


def test_attention_is_explicit_for_the_fusion_passes():
    m = small_transformer()
    attn = m.encoder.blocks[0].attn
    assert isinstance(attn, SelfAttention)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(attn, name), nn.Linear)
    assert not any(isinstance(mod, nn.MultiheadAttention) for mod in m.modules())
    graph = torch.fx.symbolic_trace(attn).graph
    targets = [n.target for n in graph.nodes if n.op in ("call_function", "call_method")]
    assert any(t in (F.softmax, torch.softmax, "softmax") for t in targets)
    assert F.scaled_dot_product_attention not in targets
    assert "scaled_dot_product_attention" not in str(graph)
    # The whole model traces too (the mask builder is an fx leaf), and the traced copy agrees.
    m.eval()
    traced = torch.fx.symbolic_trace(m)
    x = tokens(2, 5)
    x[1, 3:] = PAD_ID
    torch.testing.assert_close(traced(x), m(x))


def test_models_are_deterministic_given_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = small_transformer()
        outs.append(m(tokens(2, 6)))  # train mode: dropout draws from the seeded generator too
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# ---- Causal LM ----

def test_causal_lm_shapes_backward_and_tied_weights():
    torch.manual_seed(0)
    m = small_lm()
    x = tokens(2, 9)
    assert m(x).shape == (2, 9, VOCAB)
    check_backward(m, x)
    assert m.lm_head.weight is m.encoder.tok_emb.weight
    untied = small_lm(tie_weights=False)
    assert count_parameters(untied) == count_parameters(m) + VOCAB * 32


def test_causal_lm_is_causal():
    torch.manual_seed(0)
    m = small_lm().eval()
    x = tokens(1, 12)
    t = 7
    y = x.clone()
    y[0, t] = (x[0, t] % (VOCAB - 1)) + 1  # a different non-pad token
    assert y[0, t] != x[0, t]
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_causal_lm_shares_the_attention_module_class():
    lm_attn = small_lm().encoder.blocks[0].attn
    clf_attn = small_transformer().encoder.blocks[0].attn
    assert type(lm_attn) is type(clf_attn) is SelfAttention


# ---- registry ----

def test_build_model_by_name_and_json_args():
    spec = {"vocab_size": 8000, "max_length": 64, "num_classes": 5}
    args = model_args_from_data("transformer", spec, {"d_model": 64})
    json.dumps(args)
    m = build_model("transformer", args=args)
    assert isinstance(m, TransformerClassifier)
    assert m.encoder.tok_emb.num_embeddings == 8000 and m.head.out_features == 5
    # the stored args rebuild an identical architecture
    again = build_model(name="transformer", args=json.loads(json.dumps(args)))
    assert count_parameters(again) == count_parameters(m)


def test_model_args_from_data_fills_and_keeps_user_values():
    spec = {"vocab_size": 1000, "max_length": 128, "num_classes": 4}
    args = model_args_from_data("transformer", spec, {})
    assert args["vocab_size"] == 1000 and args["num_classes"] == 4 and args["max_length"] == 128
    assert args["d_model"] == 128 and args["pooling"] == "mean"  # defaults recorded too
    user = model_args_from_data("transformer", spec, {"vocab_size": 2000, "num_classes": 6, "n_layers": 1})
    assert user["vocab_size"] == 2000 and user["num_classes"] == 6 and user["n_layers"] == 1
    lm = model_args_from_data("causal_lm", {"vocab_size": 300, "max_length": 64}, None)
    assert lm["vocab_size"] == 300 and "num_classes" not in lm
    img = {"channels": 3, "height": 8, "width": 8, "num_classes": 10}
    assert model_args_from_data("cnn", img, {})["channels"] == 3
    mlp = model_args_from_data("mlp", img, {})
    assert mlp["num_features"] == 192 and mlp["hidden"] == [256, 128]
    assert build_model("mlp", args=mlp)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_model_args_from_data_errors():
    spec = {"vocab_size": 1000, "max_length": 128, "num_classes": 4}
    with pytest.raises(UserError, match="'transformer'.*vocab_size"):
        model_args_from_data("transformer", spec, {"vocab_size": 10})
    with pytest.raises(UserError, match="'transformer'.*bogus"):
        model_args_from_data("transformer", spec, {"bogus": 1})
    with pytest.raises(UserError, match="'transformer' needs vocab_size"):
        model_args_from_data("transformer", {"num_classes": 3}, {})
    with pytest.raises(UserError, match="known models: causal_lm, cnn, mlp, transformer"):
        model_args_from_data("nope", spec, {})


def test_build_model_reference_errors():
    known = "known models: causal_lm, cnn, mlp, transformer"
    with pytest.raises(UserError, match=f"unknown model 'resnet'.*{known}"):
        build_model("resnet", args={})
    with pytest.raises(UserError, match="model 'mlp'.*depth.*accepted parameters: num_features, num_classes"):
        build_model("mlp", args={"num_features": 4, "num_classes": 2, "depth": 3})
    with pytest.raises(UserError, match="model 'transformer'.*divisible"):
        build_model("transformer", args={"vocab_size": 10, "num_classes": 2, "d_model": 30, "n_heads": 4})
    with pytest.raises(UserError, match="model 'cnn'.*block"):
        build_model("cnn", args={"num_classes": 2, "block": "dense"})
    with pytest.raises(UserError, match="either a name"):
        build_model()
    with pytest.raises(UserError, match="either a name"):
        build_model("mlp", target="x:Y")


USER_MODULE = """
import torch
from torch import nn

class TinyNet(nn.Module):
    def __init__(self, num_features, num_classes, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        raise RuntimeError("weights file missing")

def make_tiny(num_features, num_classes):
    return TinyNet(num_features, num_classes, width=4)

def not_a_model():
    return 42

class NotAModule:
    pass

CONSTANT = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "fc_test_user_models"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "fc_test_bad_syntax.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop("fc_test_bad_syntax", None)


def test_build_model_user_target(user_module):
    args = model_args_from_data(None, {"num_features": 6, "num_classes": 3}, {"width": 16},
                                target=f"{user_module}:TinyNet")
    assert args == {"num_features": 6, "num_classes": 3, "width": 16}
    m = build_model(target=f"{user_module}:TinyNet", args=args)
    assert type(m).__name__ == "TinyNet" and m(torch.randn(2, 6)).shape == (2, 3)
    f = build_model(target=f"{user_module}:make_tiny", args={"num_features": 6, "num_classes": 2})
    assert f(torch.randn(1, 6)).shape == (1, 2)


@pytest.mark.parametrize(
    ("target", "args", "problem"),
    [
        ("fc_test_no_such_module:Net", {}, "cannot import module 'fc_test_no_such_module'"),
        ("fc_test_bad_syntax:Net", {}, "cannot import module 'fc_test_bad_syntax'.*SyntaxError"),
        ("{mod}:Missing", {}, "has no attribute 'Missing'"),
        ("{mod}:NotAModule", {}, "not a torch.nn.Module"),
        ("{mod}:CONSTANT", {}, "is a int, not an nn.Module"),
        ("{mod}:not_a_model", {}, "returned a int, not a torch.nn.Module"),
        ("{mod}:TinyNet", {"num_features": 2}, "missing a required argument.*accepted parameters: "
                                                "num_features, num_classes, width=8"),
        ("{mod}:TinyNet", {"num_features": 2, "num_classes": 2, "depth": 3}, "depth.*accepted parameters"),
        ("{mod}:Broken", {}, "constructing the model failed.*weights file missing"),
        ("no_colon_here", {}, "must look like 'package.module:ClassName'"),
    ],
)
def test_build_model_user_target_errors(user_module, target, args, problem):
    target = target.format(mod=user_module)
    with pytest.raises(UserError, match=problem) as info:
        build_model(target=target, args=args)
    message = str(info.value)
    assert repr(target) in message
    assert "\n" not in message


def test_count_parameters():
    m = nn.Linear(3, 2)
    assert count_parameters(m) == 8
    m.bias.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 6


TEXT_USER_MODULE = """
import torch
from torch import nn

class BagOfWords(nn.Module):
    def __init__(self, vocab_size, num_labels, width=16):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width)
        self.head = nn.Linear(width, num_labels)

    def forward(self, ids):
        return self.head(self.embed(ids))

class Pixels(nn.Module):
    def __init__(self, in_channels, image_size, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    def forward(self, x):
        return self.net(x)
"""


@pytest.fixture
def text_user_module(tmp_path, monkeypatch):
    name = "fc_test_text_models"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TEXT_USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_models_receive_the_data_sizes_they_accept_by_any_usual_name(text_user_module):
    text = {"vocab_size": 500, "max_length": 64, "num_classes": 4}
    args = model_args_from_data(None, text, {}, target=f"{text_user_module}:BagOfWords")
    assert args == {"vocab_size": 500, "num_labels": 4, "width": 16}
    image = {"channels": 1, "height": 8, "width": 8, "num_classes": 10}
    assert model_args_from_data(None, image, {}, target=f"{text_user_module}:Pixels") == {
        "in_channels": 1, "image_size": 8, "num_classes": 10}


def test_a_user_value_contradicting_the_data_is_one_line_before_training(text_user_module):
    text = {"vocab_size": 500, "max_length": 64, "num_classes": 4}
    with pytest.raises(UserError, match=r"vocab_size=100 is smaller than the data's vocab_size \(500\)") as info:
        model_args_from_data(None, text, {"vocab_size": 100}, target=f"{text_user_module}:BagOfWords")
    assert "\n" not in str(info.value)
    image = {"channels": 3, "height": 8, "width": 8, "num_classes": 10}
    with pytest.raises(UserError, match=r"in_channels=1 does not match the data \(in_channels=3\)"):
        model_args_from_data(None, image, {"in_channels": 1}, target=f"{text_user_module}:Pixels")


def test_a_model_for_other_data_is_refused_before_training_naming_the_run_file():
    from fullchain.config import validate_config
    from fullchain.stages.train import prepare

    cfg = validate_config({"name": "t", "model": {"name": "transformer"}, "data": {"name": "digits"}}, "run.yaml")
    with pytest.raises(UserError, match=r"^run.yaml: model 'transformer' reads text data, but the data is image"):
        prepare(cfg)
