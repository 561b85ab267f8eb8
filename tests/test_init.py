"""`ds init`: the scaffolded project validates against each engine's schema, says what a cluster needs, never
overwrites a file, builds its image where a container engine runs, and its pipeline's stages run as a CI runner
would run them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fullchain.errors import UserError
from fullchain.scaffold import scaffold
from fullchain.scaffold.validate import validate_project
from release_support import trained

NAME = "digits-release"
LOCAL_STAGES = ("test", "train", "evaluate", "ab")  # the stages that need no registry or cluster


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("project") / NAME
    scaffold(directory, image="registry.example.com/acme/digits-release")
    return directory


def manifest(project: Path, name: str) -> dict:
    return yaml.safe_load((project / "deploy" / "k8s" / name).read_text())


def test_the_scaffold_validates_against_kubernetes_the_pytorchjob_crd_and_gitlab_ci(project):
    assert validate_project(project) == []
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in (project / "deploy" / "k8s").glob("*.yaml")}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "PersistentVolumeClaim", "PyTorchJob"}


def test_validation_catches_what_a_cluster_or_gitlab_would_reject(project, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(project, broken)
    k8s = broken / "deploy" / "k8s"
    (k8s / "deployment.yaml").write_text((k8s / "deployment.yaml").read_text().replace("readinessProbe",
                                                                                       "readinesProbe"))
    job = (k8s / "pytorchjob.yaml").read_text()
    (k8s / "pytorchjob.yaml").write_text(job.replace("maxRestarts: 3", "maxRestarts: three")
                                         .replace("name: pytorch", "name: trainer"))
    ci = yaml.safe_load((broken / ".gitlab-ci.yml").read_text())
    ci["image"] = ci.pop("build-image")  # `image` is a reserved top-level keyword, not a job name
    (broken / ".gitlab-ci.yml").write_text(yaml.safe_dump(ci))

    problems = "\n".join(validate_project(broken))
    assert "deployment.yaml: Deployment digits-release" in problems and "'readinesProbe' was unexpected" in problems
    assert "pytorchjob.yaml" in problems and "spec.elasticPolicy.maxRestarts: 'three' is not of type" in problems
    assert "no container named 'pytorch'" in problems
    assert ".gitlab-ci.yml: $.image" in problems


def test_the_manifests_hold_what_a_cluster_operator_expects(project):
    deployment = manifest(project, "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (serve,) = pod["containers"]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["resources"]["requests"]["cpu"] and serve["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and serve["securityContext"]["allowPrivilegeEscalation"] is False
    token_volume = next(v for v in pod["volumes"] if "secret" in v)
    mount = next(m for m in serve["volumeMounts"] if m["name"] == token_volume["name"])
    assert serve["args"][serve["args"].index("--token-file") + 1].startswith(mount["mountPath"] + "/")
    assert pod["terminationGracePeriodSeconds"] > 60  # ds serve drains for up to 60 s on SIGTERM
    assert manifest(project, "hpa.yaml")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    job = manifest(project, "pytorchjob.yaml")["spec"]
    worker = job["pytorchReplicaSpecs"]["Worker"]
    (trainer,) = worker["template"]["spec"]["containers"]
    assert worker["restartPolicy"] == "OnFailure" and job["elasticPolicy"]["maxRestarts"] > 0
    assert trainer["command"][:3] == ["torchrun", "-m", "fullchain.cli.worker"] and "auto" in trainer["command"]
    claim = next(v for v in worker["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == manifest(project, "checkpoints-pvc.yaml")["metadata"]["name"]
    checkpoint_mount = next(m for m in trainer["volumeMounts"] if m["name"] == claim["name"])["mountPath"]
    assert f"runs_dir={checkpoint_mount}/runs" in trainer["command"]

    dockerfile = (project / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "USER 10001" in dockerfile


def test_the_pipeline_ships_only_from_the_default_branch_after_the_gates(project):
    ci = yaml.safe_load((project / ".gitlab-ci.yml").read_text())
    assert ci["stages"] == ["test", "train", "evaluate", "ab", "package", "deploy"]
    default_branch_only = [{"if": "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"}]
    for job in ("build-image", "deploy"):
        assert ci[job]["rules"] == default_branch_only
        assert {"evaluate", "ab"} <= set(ci[job]["needs"])
    assert "--gate" in " ".join(ci["evaluate"]["script"]) and "--fail-on-regression" in " ".join(ci["ab"]["script"])
    assert f"runs/{NAME}/model/" in ci["train"]["artifacts"]["paths"] and "baseline/" in ci["evaluate"]["artifacts"][
        "paths"]
    assert ".venv/" in ci["default"]["cache"]["paths"]


def test_init_never_overwrites_a_file(project, tmp_path):
    (tmp_path / "run.yaml").write_text("name: mine\n")
    with pytest.raises(UserError, match="already holds run.yaml"):
        scaffold(tmp_path)
    assert (tmp_path / "run.yaml").read_text() == "name: mine\n" and not (tmp_path / "Dockerfile").exists()
    with pytest.raises(UserError, match="--name 'Digits_Release'"):
        scaffold(tmp_path / "other", name="Digits_Release")


def run_job(project: Path, ci: dict, job: str, env: dict) -> subprocess.CompletedProcess:
    """A job's `script` as a GitLab runner runs it: one shell in the project directory, stopping at the first
    failing line, with the pipeline's and the job's variables (the image's before_script, which installs the
    requirements into .venv, is what this interpreter's environment already is)."""
    variables = {**ci.get("variables", {}), **ci[job].get("variables", {}), **env}
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(ci[job]["script"])], cwd=project,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **variables})


@pytest.mark.slow
def test_the_pipeline_stages_run_locally_in_order(project, tmp_path_factory):
    ci = yaml.safe_load((project / ".gitlab-ci.yml").read_text())
    assert [ci[job]["stage"] for job in LOCAL_STAGES] == list(LOCAL_STAGES)
    # the model in production: the same run file trained briefly (in CI, the default branch's train artifact)
    shutil.copytree(trained(tmp_path_factory, "poor"), project / "baseline" / "model")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "CI_PROJECT_DIR": str(project),
           "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           # a project variable overriding the latency gate: this machine's CPUs are shared with other tests
           "GATES": ci["variables"]["GATES"].replace("latency_p99_ms<=50", "latency_p99_ms<=2000")}
    for job in LOCAL_STAGES:
        result = run_job(project, ci, job, env)
        assert result.returncode == 0, f"{job}:\n{result.stdout}\n{result.stderr}"
    assert (project / "runs" / NAME / "model" / "model.json").is_file()
    evaluated = json.loads((project / "evaluate.json").read_text())
    assert evaluated["gates_passed"] and evaluated["baseline"]["accuracy"] < evaluated["accuracy"]
    assert json.loads((project / "ab.json").read_text())["verdict"] == "B better"  # B: the new model


@pytest.mark.slow
def test_the_dockerfile_builds_where_a_container_engine_runs(project, tmp_path_factory):
    engine = shutil.which("docker") or shutil.which("podman")
    if engine is None:
        pytest.skip("no container engine (docker or podman) on this machine")
    info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        pytest.skip(f"{engine} is installed but its daemon does not answer: {info.stderr.strip().splitlines()[-1]}")
    base = "python:3.11-slim"
    if subprocess.run([engine, "pull", base], capture_output=True, timeout=600).returncode != 0:
        pytest.skip(f"{engine} cannot pull the base image {base} (offline?)")
    # fullchain is on no index the build reaches: its wheel goes where the Dockerfile looks first
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(project / "wheels"), str(Path(__file__).resolve().parents[1])],
                           capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr
    model = project / "runs" / NAME / "model"
    if not model.is_dir():
        shutil.copytree(trained(tmp_path_factory, "good"), model)
    built = subprocess.run([engine, "build", "--target", "serve", "--tag", f"{NAME}:test", str(project)],
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr[-3000:]
