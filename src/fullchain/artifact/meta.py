"""model.json: what an artifact is (builder, arguments, input signature, task, labels, preprocessing, data recipe).

Read with `read_meta`, which refuses a file that is not one (wrong format, a builder of another shape) in one
line, before anything is built from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fullchain.errors import UserError
from fullchain.tasks import Task, task_for
from fullchain.versions import library_versions

FORMAT = "fullchain-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"
TOKENIZER = "tokenizer.json"
# What a text model needs to read requests: ours is tokenizer.json; a pretrained model's tokenizer also has these.
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt")
ONNX_FILE = "model.onnx"


BUILDERS = ("name", "target", "hf")  # a registered model, user code (--trust-code), a Hugging Face architecture


@dataclass
class ArtifactMeta:
    """Everything in model.json: how to rebuild the model and how to feed it."""

    builder: dict[str, str]  # {"name": "transformer"}, {"target": "pkg.mod:Class"} or {"hf": "BertFor..."}
    args: dict[str, Any]
    input: dict[str, Any]  # kind, dtype and the data's input_spec
    label_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None  # the data config + seed the model was trained on (for ds evaluate)
    extra: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)  # Task.describe(): its name and the model's input names

    def make_task(self) -> Task:
        """The task this model was trained for, from its input signature, label names and input names."""
        return task_for(self.input, self.label_names, self.task.get("input_names"))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "builder": self.builder,
            "args": self.args,
            "input": self.input,
            "label_names": self.label_names,
            "preprocessing": self.preprocessing,
            "data": self.data,
            "extra": self.extra,
            "task": self.task,
            "versions": library_versions(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ArtifactMeta:
        return cls(
            builder=raw["builder"],
            args=raw["args"],
            input=raw["input"],
            label_names=raw.get("label_names", []),
            preprocessing=raw.get("preprocessing", {}),
            data=raw.get("data"),
            extra=raw.get("extra", {}),
            task=raw.get("task", {}),
        )


def read_meta(directory: str | Path) -> ArtifactMeta:
    directory = Path(directory)
    meta = directory / META
    if not meta.is_file():
        raise UserError(f"{directory}: not a model artifact (no {META}); expected a directory written by ds train")
    try:
        raw = json.loads(meta.read_bytes())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{meta}: not a readable JSON document ({type(exc).__name__})") from None
    except OSError as exc:
        raise UserError(f"{meta}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{meta}: format {found!r} is not {FORMAT!r}")
    builder = raw.get("builder")
    if not (isinstance(builder, dict) and len(builder) == 1 and set(builder) <= set(BUILDERS)
            and isinstance(next(iter(builder.values())), str)):
        raise UserError(f"{meta}: builder must be one of {{\"name\": NAME}}, {{\"target\": \"pkg.module:Class\"}} "
                        "or {\"hf\": ARCHITECTURE}")
    if not isinstance(raw.get("args"), dict):
        raise UserError(f"{meta}: args must be a mapping of constructor arguments")
    try:
        return ArtifactMeta.from_json(raw)
    except KeyError as exc:
        raise UserError(f"{meta}: missing field {exc.args[0]!r}") from None
