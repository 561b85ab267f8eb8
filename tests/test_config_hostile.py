"""Hostile and careless run files: each is refused with one line naming the file and the field or line.

Covers what PyYAML and lax typing let through: alias bombs, deep nesting, bytes that are not UTF-8,
duplicate keys, quoted numbers and booleans where integers belong, inf/nan, run names that leave
runs_dir, empty `--set` segments, unknown devices and out-of-range seeds.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fullchain.config import MAX_DEPTH, ServeConfig, load_config, validate_config
from fullchain.errors import UserError

HEAD = "name: t\nmodel: {name: mlp}\ndata: {name: digits}\n"
MINIMAL = {"name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}}

ALIAS_BOMB = HEAD + "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def refusal(path: Path, *overrides: str) -> str:
    """The message `load_config` refuses PATH with; it is one line and starts with the file's name."""
    with pytest.raises(UserError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path.name}: "), message
    return message


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = write(tmp_path, ALIAS_BOMB, "bomb.yaml")
    assert path.stat().st_size < 1024
    started = time.perf_counter()
    message = refusal(path)
    assert time.perf_counter() - started < 1.0
    assert "more than 100000 values" in message and "line 9" in message


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = write(tmp_path, HEAD.replace("{name: mlp}", "{name: mlp, args: &shared {hidden: 64, depth: 2}}")
                 + "train: {optimizer: {args: {<<: *shared, depth: 3}}}\n")
    cfg = load_config(path)
    assert cfg.model.args == {"hidden": 64, "depth": 2}
    assert cfg.train.optimizer.args == {"hidden": 64, "depth": 3}


def test_deep_nesting_is_refused_with_the_line(tmp_path):
    path = write(tmp_path, HEAD + "model:\n  args:\n    x: " + "[" * 20_000 + "]" * 20_000 + "\n", "deep.yaml")
    assert refusal(path) == f"deep.yaml: line 6: nested deeper than {MAX_DEPTH} levels"


def test_depth_counts_what_aliases_expand_to(tmp_path):
    half = MAX_DEPTH // 2 + 1
    deep = "[" * half + "]" * half
    path = write(tmp_path, HEAD + f"a: &a {deep}\nb: &b {deep.replace('[]', '[*a]')}\nc: *b\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in refusal(path)


def test_alias_into_its_own_node_is_refused(tmp_path):
    assert "alias *a refers to a node that contains it" in refusal(write(tmp_path, HEAD + "x: &a [1, *a]\n"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (HEAD.encode() + b'runs_dir: "caf\xe9"\n', "latin.yaml: line 4: not UTF-8 text (byte 0xe9)"),
        (HEAD.encode() + b"runs_dir: a\x00b\n", "latin.yaml: line 4: character #x0000 is not allowed in YAML"),
        (HEAD.encode() + b"train: {epochs: [1\n", "latin.yaml: line 5: not valid YAML"),
    ],
)
def test_undecodable_or_malformed_text_names_the_line(tmp_path, content, expected):
    assert refusal(write(tmp_path, content, "latin.yaml")).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEAD + "train:\n  batch_size: 8\ntrain:\n  epochs: 2\n", "line 6: duplicate key 'train' (first on line 4)"),
        (HEAD + "train:\n  batch_size: 8\n  'batch_size': 16\n",
         "line 6: duplicate key 'batch_size' (first on line 5)"),
        ("name: t\nmodel: {name: mlp, args: {a: {b: 1, b: 2}}}\ndata: {name: digits}\n",
         "line 2: duplicate key 'b' (first on line 2)"),
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(tmp_path, text, expected):
    assert refusal(write(tmp_path, text)) == f"run.yaml: {expected}"


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ('batch_size: "32"', "train.batch_size: expected an integer, got the string '32'"),
        ("batch_size: true", "train.batch_size: expected an integer, got the boolean true"),
        ("batch_size: 8.0", "train.batch_size: expected an integer, got the number 8.0"),
        ('optimizer: {lr: "1e-3"}', "train.optimizer.lr: expected a number, got the string '1e-3'"),
        ("optimizer: {lr: false}", "train.optimizer.lr: expected a number, got the boolean false"),
        ("progress: 1", "train.progress: expected true or false, got the number 1"),
        ("progress: 'yes'", "train.progress: expected true or false, got the string 'yes'"),
        ("max_steps:", None),  # an empty value means "unset" for an optional field
        ("precision: 16", "train.precision: 16 is not one of fp32, bf16, fp16"),
    ],
)
def test_numbers_and_booleans_are_strict(tmp_path, train, expected):
    path = write(tmp_path, HEAD + f"train: {{{train}}}\n", "quickstart.yaml")
    if expected is None:
        assert load_config(path).train.max_steps is None
    else:
        assert refusal(path) == f"quickstart.yaml: {expected}"


def test_a_float_field_takes_an_integer_and_exponent_notation(tmp_path):
    cfg = load_config(write(tmp_path, HEAD + "train: {optimizer: {lr: 1, weight_decay: 1e-2}}\n"))
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.train.optimizer.weight_decay == 0.01  # PyYAML alone reads 1e-2 as a string
    assert ServeConfig(max_wait_ms=5).max_wait_ms == 5.0


def test_set_values_stay_typed(tmp_path):
    path = write(tmp_path, HEAD)
    cfg = load_config(path, ["train.max_steps=50", "train.progress=false", "train.optimizer.lr=1e-4"])
    assert (cfg.train.max_steps, cfg.train.progress, cfg.train.optimizer.lr) == (50, False, 1e-4)
    quoted = refusal(path, "train.max_steps='50'")
    assert quoted == "run.yaml: train.max_steps: expected an integer, got the string '50'"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("train: {optimizer: {lr: .inf}}", "train.optimizer.lr: should be a finite number, got the number inf"),
        ("distributed: {timeout_s: -.inf}", "distributed.timeout_s: should be a finite number, got the number -inf"),
        ("serve: {max_wait_ms: .nan}", "serve.max_wait_ms: should be a finite number, got the number nan"),
        ("model: {name: mlp, args: {layers: [{dropout: .nan}]}}", "model.args: layers.0.dropout is nan"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, section, expected):
    text = "name: t\ndata: {name: digits}\n" + ("" if section.startswith("model") else "model: {name: mlp}\n")
    assert expected in refusal(write(tmp_path, text + section + "\n"))


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/tmp/x", "a\\b", ""])
def test_run_name_cannot_leave_runs_dir(tmp_path, name):
    message = refusal(write(tmp_path, yaml.safe_dump({**MINIMAL, "name": name})))
    assert message.startswith(f"run.yaml: name: {name!r} must be one directory name")


@given(st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True))
def test_every_accepted_name_is_one_directory_under_runs_dir(name):
    try:
        cfg = validate_config({**MINIMAL, "name": name, "runs_dir": "runs"})
    except UserError:
        assert name in (".", "..")
        return
    assert os.path.dirname(os.path.normpath(cfg.run_dir)) == "runs"


@given(st.lists(st.sampled_from(["", "train", "batch_size"]), min_size=1, max_size=4).filter(lambda p: "" in p))
def test_set_path_with_an_empty_segment_is_refused(segments):
    assignment = ".".join(segments) + "=8"
    with pytest.raises(UserError) as err:
        load_config(Path(__file__).parents[1] / "examples" / "quickstart.yaml", [assignment])
    assert str(err.value).startswith(f"--set {assignment!r}: ") and "empty name" in str(err.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_are_accepted(device):
    assert validate_config({**MINIMAL, "train": {"device": device}}).train.device == device


@pytest.mark.parametrize("device", ["quantum", "CUDA", "cuda:", "cuda:x", "cpu:0", ""])
def test_unknown_device_is_refused_listing_the_accepted_ones(tmp_path, device):
    message = refusal(write(tmp_path, yaml.safe_dump({**MINIMAL, "train": {"device": device}})))
    assert message == f"run.yaml: train.device: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"


@pytest.mark.parametrize(("seed", "ok"), [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_seed_must_suit_numpy(tmp_path, seed, ok):
    path = write(tmp_path, yaml.safe_dump({**MINIMAL, "seed": seed}))
    if ok:
        assert load_config(path).seed == seed
    else:
        assert refusal(path).startswith("run.yaml: seed: should be ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "run.yaml: name: is required; model: is required; data: is required"),
        ("- name: t\n", "run.yaml: the top level must be a mapping of sections, got a list"),
        ("just words\n", "run.yaml: the top level must be a mapping of sections, got the string 'just words'"),
        ("name: t\n---\nname: u\n", "run.yaml: line 2: not valid YAML (but found another document)"),
        ("train: 5\n" + HEAD, "run.yaml: train: expected a mapping, got the number 5"),
    ],
)
def test_wrong_shapes_are_one_line(tmp_path, text, expected):
    assert refusal(write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (ALIAS_BOMB.encode(), "run.yaml: line 9: more than 100000 values"),
        (b"name: " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "run.yaml: line 1: nested deeper than"),
        (HEAD.encode() + b'runs_dir: "caf\xe9"\n', "run.yaml: line 4: not UTF-8 text"),
    ],
)
def test_ds_config_show_exits_2_with_one_line(tmp_path, content, expected):
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "config", "show", write(tmp_path, content)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
