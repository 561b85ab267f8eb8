"""Loading is not executing: crafted model directories, run files and program archives run nothing.

Each attack writes a marker file when it succeeds; every test asserts the marker is absent and the command
exits 2 with one line. Where it matters, the test first shows that the crafted file really is an attack
(plain torch would run it), so a refusal that happened for another reason would not pass for safety.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fullchain.artifact import ArtifactMeta, load_artifact, save_artifact
from fullchain.artifact.program import check_program_archive
from fullchain.errors import UserError
from fullchain.models import build_model
from fullchain.models.targets import TRUST_ENV, TargetOrigin

DS = [sys.executable, "-m", "fullchain.cli"]


def ds(*args, env=None, cwd=None):
    return subprocess.run([*DS, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def assert_one_line_refusal(result, *needles):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real, small MLP artifact whose model.json the tests then tamper with."""
    root = tmp_path_factory.mktemp("artifact")
    args = {"num_features": 4, "num_classes": 3, "hidden": [8]}
    spec = ArtifactMeta(builder={"name": "mlp"}, args=args, input={"kind": "features", "num_features": 4},
                     label_names=["a", "b", "c"])
    save_artifact(root, build_model(name="mlp", args=args), spec)
    return root


def crafted_artifact(artifact: Path, tmp_path: Path, builder: dict, args: dict) -> Path:
    directory = tmp_path / "crafted"
    directory.mkdir()
    meta = json.loads((artifact / "model.json").read_text())
    meta.update(builder=builder, args=args)
    (directory / "model.json").write_text(json.dumps(meta))
    (directory / "model.safetensors").write_bytes((artifact / "model.safetensors").read_bytes())
    return directory


def attacks(marker: Path) -> list[tuple[str, dict]]:
    return [
        ("os:system", {"command": f"touch {marker}"}),
        ("subprocess:getoutput", {"cmd": f"touch {marker}"}),
        ("subprocess:run", {"args": f"touch {marker}", "shell": True}),
        ("pathlib:Path.touch", {"self": str(marker)}),
        ("posix:system", {"command": f"touch {marker}"}),
        ("torch.hub:load", {"repo_or_dir": str(marker), "model": "x"}),
    ]


@pytest.mark.parametrize("index", range(6))
def test_a_crafted_builder_target_runs_nothing_even_with_trust_code(artifact, tmp_path, index):
    marker = tmp_path / "pwned"
    target, args = attacks(marker)[index]
    directory = crafted_artifact(artifact, tmp_path, {"target": target}, args)
    for trust in (False, True):
        with pytest.raises(UserError) as info:
            load_artifact(directory, trust_code=trust)
        assert "\n" not in str(info.value) and repr(target) in str(info.value)
        assert not marker.exists()


def test_ds_evaluate_export_and_serve_refuse_in_one_line(artifact, tmp_path):
    marker = tmp_path / "pwned"
    directory = crafted_artifact(artifact, tmp_path, {"target": "os:system"}, {"command": f"touch {marker}"})
    for command in (["evaluate", directory], ["export", directory], ["serve", directory, "--port", "0"],
                    ["optimize", directory, "--out", tmp_path / "out"]):
        assert_one_line_refusal(ds(*command), "builder.target 'os:system'", "standard library")
    assert not marker.exists()


USER_PACKAGE = """
import pathlib, torch
pathlib.Path({marker!r}).write_text("imported")  # what an author's code could do on import

class Net(torch.nn.Module):
    def __init__(self, num_features, num_classes, hidden=None):
        super().__init__()
        self.fc = torch.nn.Linear(num_features, num_classes)

    def forward(self, x):
        return self.fc(x)
"""


def test_third_party_code_is_imported_only_with_trust_code_or_a_trusted_package(artifact, tmp_path):
    marker = tmp_path / "imported"
    package = tmp_path / "pkgs"
    package.mkdir()
    (package / "fc_author_models.py").write_text(textwrap.dedent(USER_PACKAGE.format(marker=str(marker))))
    directory = tmp_path / "model"
    args = {"num_features": 4, "num_classes": 3}
    spec = ArtifactMeta(builder={"target": "fc_author_models:Net"}, args=args,
                     input={"kind": "features", "num_features": 4}, label_names=["a", "b", "c"])
    save_artifact(directory, torch.nn.Module(), spec)  # no weights needed: loading stops before them
    env = {"PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}

    refused = ds("evaluate", directory, "--data", "digits", env=env)
    assert_one_line_refusal(refused, "--trust-code", TRUST_ENV)
    assert not marker.exists()  # not even imported

    trusted = ds("evaluate", directory, "--data", "digits", "--trust-code", env=env)
    assert marker.exists() and "Traceback" not in trusted.stderr  # imported; fails later on the empty weights
    marker.unlink()
    listed = ds("evaluate", directory, "--data", "digits", env={**env, TRUST_ENV: "other,fc_author_models"})
    assert marker.exists() and "--trust-code" not in listed.stderr


def test_run_file_targets_in_the_standard_library_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run.yaml"
    run.write_text(textwrap.dedent(f"""
        name: t
        runs_dir: {tmp_path / 'runs'}
        model: {{target: "os:system", args: {{command: "touch {marker}"}}}}
        data: {{name: digits}}
        train: {{max_steps: 1, progress: false}}
    """))
    assert_one_line_refusal(ds("train", run), "model.target 'os:system'", "standard library")
    overridden = ds("train", run, "--set", "model.target=subprocess:getoutput", "--set",
                    f"model.args={{cmd: touch {marker}}}")
    assert_one_line_refusal(overridden, "subprocess:getoutput")
    assert not marker.exists()


def test_a_run_file_may_name_its_own_factory_but_not_a_function_from_torch(tmp_path, monkeypatch):
    (tmp_path / "fc_own_models.py").write_text(textwrap.dedent("""
        import torch
        from torch.hub import load as fetch
        def make(num_features, num_classes):
            return torch.nn.Linear(num_features, num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(build_model(target="fc_own_models:make", args={"num_features": 2, "num_classes": 2}),
                      torch.nn.Linear)
    with pytest.raises(UserError, match="torch.hub.load is not a model factory"):
        build_model(target="fc_own_models:fetch", args={"repo_or_dir": "x", "model": "y"})
    with pytest.raises(UserError, match="dunder"):
        build_model(target="fc_own_models:make.__globals__", args={})
    origin = TargetOrigin("x/model.json", from_artifact=True)
    with pytest.raises(UserError, match="--trust-code"):
        build_model(target="fc_own_models:make", args={}, origin=origin)


# ---- program archives (model.pt2) ------------------------------------------------------------------------------


class Touch:
    """Unpickling this runs `touch PATH`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    exported = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path_factory.mktemp("program") / "model.pt2"
    torch.export.save(exported, str(path))
    return path


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip archive, letting `change(name, data)` return new bytes (or None to drop the member)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        root = old.namelist()[0].partition("/")[0]
        for info in old.infolist():
            data = change(info.filename.partition("/")[2], old.read(info))
            if data is not None:
                new.writestr(info, data)
        for name, data in change.extra.items() if hasattr(change, "extra") else ():
            new.writestr(f"{root}/{name}", data)
    return dst


def evil_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Touch(marker), buffer)
    return buffer.getvalue()


def pickled_sample_inputs(marker):
    return lambda name, data: evil_pickle(marker) if name.startswith("data/sample_inputs/") else data


def opaque_constant(marker):
    def change(name, data):
        if name.endswith("_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "use_pickle": True}}}).encode()
        return data
    change.extra = {"data/constants/opaque_obj_0": pickle.dumps(Touch(marker))}
    return change


def legacy_weights(marker):
    def change(name, data):
        return data
    change.extra = {"data/weights/model.pt": evil_pickle(marker)}
    return change


def shape_expression(marker):
    def change(name, data):
        if name.startswith("models/"):
            payload = f"__import__(\'os\').system(\'touch {marker}\') or Symbol("
            return data.replace(b'"expr_str": "Symbol(', f'"expr_str": "{payload}'.encode())
        return data
    return change


def node_target(marker):
    def change(name, data):
        if name.startswith("models/"):
            return data.replace(b'"torch.ops.aten.linear.default"', b'"torch.hub.load"')
        return data
    return change


@pytest.mark.parametrize(("route", "why"), [
    (pickled_sample_inputs, "needs full unpickling"),
    (opaque_constant, "unexpected member"),
    (legacy_weights, "unexpected member"),
    (shape_expression, "symbolic expression"),
    (node_target, "not a registered tensor op"),
])
def test_a_crafted_program_is_refused_before_torch_opens_it(program, tmp_path, route, why):
    from fullchain.artifact.program import load_program

    marker = tmp_path / "pwned"
    crafted = rewrite(program, tmp_path / "model.pt2", route(marker))
    with pytest.raises(UserError, match=why) as info:
        load_program(crafted, compile=False)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    if route in (pickled_sample_inputs, shape_expression):  # the attack is real: plain torch runs it
        try:
            torch.export.load(str(crafted))
        except Exception:  # noqa: BLE001 - the payload ran before whatever torch complains about
            pass
        assert marker.exists()


def test_a_genuine_program_passes_the_check_and_runs(program):
    from fullchain.artifact.program import load_program

    check_program_archive(program)
    module = load_program(program, compile=False)
    assert module(torch.randn(5, 4)).shape == (5, 3)


def test_ds_serve_refuses_a_crafted_int8_artifact_in_one_line(artifact, program, tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "int8"
    directory.mkdir()
    meta = json.loads((artifact / "model.json").read_text())
    meta["extra"] = {"quantize": {"method": "ptq", "backend": "inductor", "file": "model.pt2"}}
    (directory / "model.json").write_text(json.dumps(meta))
    rewrite(program, directory / "model.pt2", pickled_sample_inputs(marker))
    assert_one_line_refusal(ds("serve", directory, "--port", "0"), "refusing to load this program")
    assert not marker.exists()
