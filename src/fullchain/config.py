"""The typed schema of a run, loaded from one YAML file.

Every section is a pydantic model that forbids unknown keys, so a typo fails loudly. Errors are
reported as one line naming the file, the dotted path of the field and what was expected, e.g.
``quickstart.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16``.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fullchain.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Section):
    """A subword tokenizer trained on the training split only (the `tokenizers` library)."""

    kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = Field(8000, ge=100)
    max_length: int = Field(256, ge=8)
    lowercase: bool = True


class DataConfig(Section):
    """Which dataset, how to split it, and how to turn it into tensors.

    `name` is a built-in set (bbc_news, fashion_mnist, digits), a user format (csv, jsonl,
    image_folder, npz) read from `path`, or `lm_text` (a causal-LM stream over BBC News).
    """

    name: Literal["bbc_news", "fashion_mnist", "digits", "csv", "jsonl", "image_folder", "npz", "lm_text"]
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_samples: int | None = Field(None, ge=10, description="keep a stratified slice of this many samples")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    image_size: int | None = Field(None, ge=4, description="resize image_folder images to this square size")
    block_size: int = Field(128, ge=8, description="sequence length for lm_text")

    @model_validator(mode="after")
    def _path_for_user_formats(self) -> DataConfig:
        if self.name in ("csv", "jsonl", "image_folder", "npz") and not self.path:
            raise ValueError(f"data.path is required when data.name is {self.name!r}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class ModelConfig(Section):
    """A reference model by `name`, or a user model by `target: "pkg.module:Class"`; `args` go to it."""

    name: str | None = None
    target: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of_name_or_target(self) -> ModelConfig:
        if (self.name is None) == (self.target is None):
            raise ValueError("give exactly one of model.name (a reference model) or model.target ('pkg.module:Class')")
        if self.target is not None and ":" not in self.target:
            raise ValueError(f"model.target {self.target!r} must look like 'pkg.module:Class'")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    args: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the optimiser")


class ScheduleConfig(Section):
    """Linear warm-up for `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at the last step."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainConfig(Section):
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    clip_norm: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations; None: end of each epoch")
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    progress: bool = True
    tensorboard: bool = True

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        return self


class CheckpointConfig(Section):
    """Atomic, checksummed checkpoints under runs/<name>/checkpoints/ (see fullchain.train.checkpoint)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    enabled: bool = True
    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1, description="also keep every checkpoint whose step is a multiple")
    async_save: bool = Field(True, alias="async", description="persist in the background after staging to CPU")


class TopologyConfig(Section):
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node; default: torchrun's local world size")


class DistributedConfig(Section):
    """Data-parallel settings; the number of processes comes from the launch (`ds train --nproc-per-node`)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(60.0, gt=0, description="collective timeout: how fast a dead peer is noticed")
    compression: Literal["none", "fp16", "bf16", "powersgd", "int8"] = "none"
    chunk_size: int = Field(256, ge=16, description="int8: elements sharing one scale")
    compression_start_step: int = Field(10, ge=0, description="uncompressed steps before compression starts")
    hierarchical: bool = Field(False, description="reduce inside each node first, then across nodes")
    bucket_cap_mb: float = Field(25.0, gt=0)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)


class OptimizeConfig(Section):
    """The optimise stage (`ds optimize`): graph passes, optional quantisation, inference precision, compile."""

    enabled: bool = False
    passes: list[str] = Field(default_factory=lambda: ["all"], description="pass names, or 'all'")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    quantize: Literal["none", "ptq", "qat", "dynamic"] = "none"
    backend: Literal["inductor", "onnxruntime"] = "inductor"
    calib_samples: int = Field(512, ge=1, description="PTQ: training samples fed through the observers")
    qat_steps: int = Field(300, ge=1, description="QAT: fine-tuning steps with fake quantisation")
    qat_lr: float = Field(1e-4, gt=0)
    max_accuracy_drop: float = Field(1.0, ge=0, description="points of test accuracy a quantised model may lose")


class ExportConfig(Section):
    """The export stage (`ds export`): ONNX (with a parity check in ONNX Runtime) or TensorRT."""

    enabled: bool = False
    format: Literal["onnx", "tensorrt"] = "onnx"
    dynamic_batch: bool = True
    opset: int | None = Field(None, ge=13)


class ServeConfig(Section):
    """`ds serve` settings, and the short serve-and-load stage of `ds run`."""

    enabled: bool = False
    runtime: Literal["torch", "onnxruntime"] = "torch"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(1024, ge=1, description="requests waiting beyond this get 503 with Retry-After")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    threads: int | None = Field(None, ge=1, description="intra-op threads for inference; default: half the cores")
    load_seconds: float = Field(5.0, gt=0, description="ds run: how long the serve-and-load stage drives load")
    load_concurrency: int = Field(16, ge=1)


class MonitorConfig(Section):
    """Live metrics of a training run: the Trainer serves Prometheus /metrics and /dashboard on this port."""

    port: int | None = Field(None, ge=0, le=65535, description="unset: no endpoint")
    host: str = "127.0.0.1"


class RunConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    runs_dir: str = "runs"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def describe_error(err: dict[str, Any]) -> str:
    """One readable phrase for one pydantic error."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{value!r} is not one of {allowed}"
    if kind == "extra_forbidden":
        return f"unknown key {value!r}" if not isinstance(value, dict | list) else "unknown key"
    if kind == "missing":
        return "is required"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        wanted = kind.split("_")[0]
        return f"expected {wanted}, got {value!r}"
    return err["msg"].removeprefix("Value error, ")


def format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        phrase = describe_error(err)
        if err["type"] == "extra_forbidden":
            loc, key = loc.rpartition(".")[0], loc.rpartition(".")[2]
            phrase = f"unknown key {key!r}"
        parts.append(f"{loc}: {phrase}" if loc else phrase)
    return f"{source}: " + "; ".join(parts)


def parse_value(text: str) -> Any:
    """Parse a `--set` value the way YAML would (`50` -> int, `bf16` -> str, `[1,2]` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to the raw config mapping, creating sections as needed."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    key, _, value = assignment.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {assignment!r}: empty key")
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[path[-1]] = parse_value(value)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run file; every problem becomes a `UserError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such run file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path.name}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path.name}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source=path.name)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
