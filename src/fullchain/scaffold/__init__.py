"""`ds init DIR`: a project that goes from a laptop to a cluster, with files its engines accept as they are.

It writes a run file, a test of it, a GitLab pipeline (test -> train -> evaluate with gates -> ab -> package ->
deploy, shipping only from the default branch and only when the gates pass), a Dockerfile for `ds serve` and
`deploy/k8s/`: the serving Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget, and a Kubeflow
PyTorchJob with its checkpoint volume for multi-node training. The files are Jinja templates (package data under
``templates/``) filled with the project's name and image; `validate` checks the result against each engine's
schema. Existing files are never overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from fullchain import __version__
from fullchain.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
# template path -> project path, where they differ (dot files are awkward as package data; .py templates would
# be imported and linted as fullchain's own modules)
RENAMED = {"gitlab-ci.yml": ".gitlab-ci.yml", "dockerignore": ".dockerignore"}
TEMPLATE_SUFFIX = ".tmpl"
# a DNS-1123 label (Kubernetes object names), short enough for the "-checkpoints" and "-train" suffixes
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


def template_paths() -> list[Path]:
    return sorted(p.relative_to(TEMPLATES) for p in TEMPLATES.rglob("*") if p.is_file())


def project_path(template: Path) -> Path:
    name = RENAMED.get(template.as_posix(), template.as_posix()).removesuffix(TEMPLATE_SUFFIX)
    return Path(name)


def default_name(directory: Path) -> str:
    return re.sub(r"[^a-z0-9]+", "-", directory.resolve().name.lower()).strip("-")[:40].strip("-")


def scaffold(directory: Path, name: str | None = None, image: str | None = None) -> list[Path]:
    """Write the project into `directory` (created if needed); returns the files written."""
    name = name or default_name(directory)
    if not NAME.match(name):
        raise UserError(f"--name {name!r}: use 1-40 lowercase letters, digits and '-', starting and ending with a "
                        "letter or digit (it names Kubernetes objects)")
    image = image or f"registry.example.com/{name}"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", image) or image.rsplit("/", 1)[-1].count(":"):
        raise UserError(f"--image {image!r}: give an image repository without a tag, e.g. registry.example.com/{name}")
    targets = {template: directory / project_path(template) for template in template_paths()}
    existing = [str(path.relative_to(directory)) for path in targets.values() if path.exists()]
    if existing:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UserError(f"{directory}: already holds {shown}; ds init never overwrites a file: move them away or "
                        "pick another directory")
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
                      autoescape=False)
    for template, path in targets.items():
        text = env.get_template(template.as_posix()).render(name=name, image=image, version=__version__)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(targets.values())
