"""Does each file of a `ds init` project pass the schema of the engine that reads it? Offline, no cluster needed.

- Kubernetes manifests (``deploy/k8s/*.yaml``): the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`,
  strict (an unknown field is an error, as with ``kubectl apply --validate=strict``).
- The PyTorchJob: the Kubeflow training operator's CRD schema (vendored, see ``schemas/SOURCE.md``), with
  unknown fields rejected the same way, and the operator's webhook rule that the trainer container is named
  ``pytorch``.
- ``.gitlab-ci.yml``: GitLab's CI JSON schema as `check-jsonschema` ships it (``vendor.gitlab-ci``).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.31.0"
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {("kubeflow.org/v1", "PyTorchJob"): "pytorchjob-kubeflow.org-v1.json"}
PYTORCH_CONTAINER = "pytorch"  # the training operator's webhook rejects a PyTorchJob without a container of this name


def validate_project(directory: Path) -> list[str]:
    """Every problem found, one line each naming the file (and the object in it); empty when all pass."""
    problems = [*validate_gitlab_ci(directory / ".gitlab-ci.yml")]
    for manifest in sorted((directory / "deploy" / "k8s").glob("*.yaml")):
        problems += validate_manifests(manifest)
    return problems


def validate_manifests(path: Path) -> list[str]:
    problems = []
    for index, document in enumerate(yaml.safe_load_all(path.read_text())):
        if document is None:
            continue
        where = f"{path}: {document.get('kind')} {document.get('metadata', {}).get('name')} (document {index + 1})"
        key = (document.get("apiVersion"), document.get("kind"))
        if key in CRD_SCHEMAS:
            problems += [f"{where}: {p}" for p in _crd_problems(document, CRD_SCHEMAS[key])]
            continue
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"{where}: no Kubernetes {KUBERNETES_VERSION} schema for it ({exc})")
    return problems


def _crd_problems(document: dict[str, Any], schema_file: str) -> list[str]:
    validator = jsonschema.Draft7Validator(_strict_schema(schema_file))
    problems = [f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
                for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))]
    if document.get("kind") == "PyTorchJob":
        for replica, spec in document.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
            containers = spec.get("template", {}).get("spec", {}).get("containers", [])
            if not any(c.get("name") == PYTORCH_CONTAINER for c in containers):
                problems.append(f"spec.pytorchReplicaSpecs.{replica}: no container named {PYTORCH_CONTAINER!r}")
    return problems


@cache
def _strict_schema(schema_file: str) -> dict[str, Any]:
    """The CRD's schema with unknown fields rejected wherever it lists the fields (the API server drops them
    silently by default, so a misspelt field would otherwise pass and do nothing)."""
    schema = copy.deepcopy(json.loads((SCHEMAS / schema_file).read_text()))

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                tighten(value)
        elif isinstance(node, list):
            for value in node:
                tighten(value)

    tighten(schema["properties"]["spec"])
    return schema


def validate_gitlab_ci(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.gitlab-ci",
                             "--data-transform", "gitlab-ci", "--output-format", "json", str(path)],
                            capture_output=True, text=True)
    if result.returncode == 0:
        return []
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return [f"{path}: check-jsonschema exited {result.returncode}: {result.stderr.strip()[-300:]}"]
    problems = []
    for error in report.get("errors", []):
        best = error.get("best_match", error)
        problems.append(f"{path}: {best['path']}: {_shortened(best['message'])}")
    for error in report.get("parse_errors", []):
        problems.append(f"{path}: cannot parse: {_shortened(error.get('message', str(error)))}")
    return problems or [f"{path}: check-jsonschema exited {result.returncode}"]


def _shortened(message: str, limit: int = 200) -> str:
    """GitLab's schema errors quote the whole job; the path already says where."""
    return message if len(message) <= limit else message[:limit] + "..."
