"""The model artifact: rebuilt without pickle, identical outputs, clear errors for a wrong directory."""

import json

import pytest
import torch

from fullchain.artifact import ArtifactMeta, load_artifact, read_meta, save_artifact
from fullchain.errors import UserError
from fullchain.models import build_model


def spec_for(name, args):
    return ArtifactMeta(builder={"name": name}, args=args, input={"kind": "lm"}, label_names=[])


@pytest.mark.parametrize(
    ("name", "args", "example"),
    [
        ("causal_lm", {"vocab_size": 50, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "max_length": 12},
         torch.randint(1, 50, (2, 12))),
        ("cnn", {"num_classes": 3, "channels": 1, "widths": [8, 16, 16]}, torch.randn(2, 1, 12, 12)),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path, name, args, example):
    torch.manual_seed(0)
    model = build_model(name=name, args=args).eval()
    save_artifact(tmp_path, model, spec_for(name, args))
    rebuilt, spec = load_artifact(tmp_path)
    assert spec.builder == {"name": name} and spec.args == args
    assert torch.equal(model(example), rebuilt(example))
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__


def test_tied_weights_stay_tied(tmp_path):
    args = {"vocab_size": 30, "d_model": 8, "n_heads": 2, "n_layers": 1, "d_ff": 16, "max_length": 8}
    save_artifact(tmp_path, build_model(name="causal_lm", args=args), spec_for("causal_lm", args))
    rebuilt, _ = load_artifact(tmp_path)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.encoder.tok_emb.weight.data_ptr()


def test_weights_from_another_architecture_name_the_mismatched_keys(tmp_path):
    small = {"num_classes": 3, "channels": 1, "widths": [8, 16, 16]}
    save_artifact(tmp_path, build_model(name="cnn", args=small), spec_for("cnn", small))
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["args"]["blocks_per_stage"] = [2, 1, 1]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"weights do not fit .* missing \['stages"):
        load_artifact(tmp_path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(UserError, match="not a model artifact"):
        read_meta(tmp_path)
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(UserError, match="invalid JSON"):
        read_meta(tmp_path)
