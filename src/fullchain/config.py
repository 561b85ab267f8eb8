"""The typed schema of a run, loaded from one YAML file.

Every section is a pydantic model that forbids unknown keys, so a typo fails loudly. Types are strict: a quoted
number or a boolean where an integer belongs is an error, not a silent conversion, and inf/nan are refused.
Errors are reported as one line naming the file, the dotted path of the field and what was expected, e.g.
``quickstart.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16``.
``--set a.b=c`` overrides are applied to the raw YAML before validation, so they are checked the same way.

Run files are read with `RunFileLoader`, PyYAML's safe loader with three guards PyYAML lacks (written here
because no YAML library offers them): a cap on nesting depth, a cap on the nodes that aliases expand to
("billion laughs"), and refusal of duplicate keys, which PyYAML resolves by silently keeping the last.
It also reads `3e-4` as a number, as YAML 1.2 does; PyYAML's YAML 1.1 rules would make it a string.
"""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fullchain.errors import UserError

MAX_DEPTH = 64
MAX_NODES = 100_000


class RunFileError(yaml.MarkedYAMLError):
    """A run file that is valid YAML but refused: too deep, too large once aliases expand, or a duplicate key."""


class RunFileLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses nesting beyond `MAX_DEPTH`, expansion beyond `MAX_NODES` and duplicate keys.

    Depth and size count what the document means, not what it spells: an alias counts as the whole
    node it refers to, so a small file of nested aliases is refused before anything is built from it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._extent: dict[yaml.Node, tuple[int, int]] = {}  # node -> (expanded size, height)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self._extent:
                raise RunFileError(None, None, f"alias *{event.anchor} refers to a node that contains it",
                                   event.start_mark)
            size, height = self._extent[node]
            self._count(size, self._depth + height, event.start_mark)
            return node
        self._count(1, self._depth + 1, event.start_mark)
        self._depth += 1
        node = super().compose_node(parent, index)
        self._depth -= 1
        extents = [self._extent[child] for child in self._children(node)]
        self._extent[node] = (1 + sum(e[0] for e in extents), 1 + max((e[1] for e in extents), default=0))
        return node

    @staticmethod
    def _children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [child for pair in node.value for child in pair]
        return node.value if isinstance(node, yaml.SequenceNode) else []

    def _count(self, nodes: int, depth: int, mark: yaml.Mark) -> None:
        self._nodes += nodes
        if depth > MAX_DEPTH:
            raise RunFileError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        if self._nodes > MAX_NODES:
            raise RunFileError(None, None, f"more than {MAX_NODES} values (counting what aliases expand to)", mark)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                first = first_seen.setdefault((key.tag, key.value), key)
                if first is not key:
                    raise RunFileError(None, None, f"duplicate key {key.value!r} (first on line "
                                       f"{first.start_mark.line + 1})", key.start_mark)
        return node


RunFileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse one YAML document with `RunFileLoader`; raises `yaml.YAMLError` (with a mark where known)."""
    return yaml.load(text, Loader=RunFileLoader)  # a SafeLoader: builds no Python objects from tags


def _finite_values(value: Any, where: str = "") -> Any:
    """Free-form arguments may hold any YAML value but inf or nan, which no model or optimiser means."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} is {value}; use a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _finite_values(item, f"{where}.{key}" if where else str(key))
    return value


Arguments = Annotated[dict[str, Any], AfterValidator(_finite_values)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


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
    """A reference model by `name`, a user model by `target: "pkg.module:Class"`, or a pretrained Hugging Face
    checkpoint by `hf: SOURCE` (a local directory, or an installed package that ships one); `args` go to it."""

    name: str | None = None
    target: str | None = None
    hf: str | None = Field(None, description="a local transformers checkpoint directory or an installed package")
    args: Arguments = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        from fullchain.models.registry import MODELS

        if name is not None and name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
        return name

    @model_validator(mode="after")
    def _one_builder(self) -> ModelConfig:
        given = [k for k in ("name", "target", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model.name (a reference model), model.target ('pkg.module:Class') "
                             "or model.hf (a Hugging Face checkpoint)")
        if self.target is not None and ":" not in self.target:
            raise ValueError(f"model.target {self.target!r} must look like 'pkg.module:Class'")
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    head_lr_scale: float = Field(20.0, gt=0, description="a pretrained model's newly initialised head learns at "
                                                         "lr x this (1e-3 for the usual 5e-5), its body at lr")
    args: Arguments = Field(default_factory=dict, description="extra keyword arguments for the optimiser")


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
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    progress: bool = True
    tensorboard: bool = True
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient (fp32, bf16): stop keeping the last good checkpoint, or "
                            "skip the update and count it; fp16's loss scaler skips such steps by itself")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"{device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        return device

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        return self


class CheckpointConfig(Section):
    """Atomic, checksummed checkpoints under runs/<name>/checkpoints/ (see fullchain.train.checkpoint)."""

    model_config = ConfigDict(populate_by_name=True)

    enabled: bool = True
    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1, description="also keep every checkpoint whose step is a multiple")
    async_save: bool = Field(True, alias="async", description="persist in the background after staging to CPU")


class TopologyConfig(Section):
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node; default: torchrun's local world size")


class MeshConfig(Section):
    """Parallel dimensions (fullchain.distributed.mesh); replicate x shard x tensor = world size, unset ones fill."""

    replicate: int | None = Field(None, ge=1, description="copies of the sharded model (HSDP when > 1)")
    shard: int | None = Field(None, ge=1, description="ranks that shard parameters and optimiser state (FSDP2)")
    tensor: int | None = Field(None, ge=1, description="ranks that split each layer (tensor parallel, hybrid)")


class BalanceConfig(Section):
    """Dynamic load balancing: each rank's share of the global batch follows its measured throughput."""

    enabled: bool = False
    every_steps: int = Field(10, ge=1, description="steps between re-balancing")
    min_share: float = Field(0.05, gt=0, lt=1, description="the smallest fraction of the global batch a rank gets")


class PlacementConfig(Section):
    """The placement planner (`ds plan`): big sparse tables on the CPU, dense layers on the accelerator."""

    enabled: bool = Field(False, description="ds train applies the plan: tables on the CPU with SparseAdam, the "
                                             "rest on train.device with train.optimizer (one process)")
    sparse_threshold_mb: float = Field(64.0, gt=0, description="an embedding table this big goes to the CPU")
    accelerator_memory_gb: float | None = Field(None, gt=0, description="the accelerator's memory budget "
                                                                        "(default: the device's own, if any)")


class DistributedConfig(Section):
    """Parallel settings; the number of processes comes from the launch (`ds train --nproc-per-node`)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(60.0, gt=0, description="collective timeout: how fast a dead peer is noticed")
    compression: Literal["none", "fp16", "bf16", "powersgd", "int8"] = "none"
    chunk_size: int = Field(256, ge=16, description="int8: elements sharing one scale")
    compression_start_step: int = Field(10, ge=0, description="uncompressed steps before compression starts")
    hierarchical: bool = Field(False, description="reduce inside each node first, then across nodes")
    bucket_cap_mb: float = Field(25.0, gt=0)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    strategy: Literal["ddp", "fsdp", "hybrid"] = Field("ddp", description="ddp, fsdp (FSDP2 / HSDP) or hybrid "
                                                                          "(tensor parallel x FSDP2)")
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)

    @model_validator(mode="after")
    def _strategy_fits_settings(self) -> DistributedConfig:
        tensor = self.mesh.tensor
        if self.strategy != "hybrid" and tensor not in (None, 1):
            raise ValueError(f"mesh.tensor: {tensor} needs strategy hybrid (strategy {self.strategy} "
                             "has no tensor dimension)")
        if self.strategy == "hybrid" and (tensor is None or tensor < 2):
            raise ValueError("mesh.tensor: strategy hybrid needs tensor >= 2 (ranks per layer)")
        if self.strategy == "ddp" and (self.mesh.shard or 1) > 1:
            raise ValueError(f"mesh.shard: {self.mesh.shard} needs strategy fsdp or hybrid "
                             "(ddp replicates the whole model)")
        if self.balance.enabled and self.strategy == "hybrid":
            raise ValueError("balance.enabled: load balancing needs strategy ddp or fsdp; hybrid's tensor-parallel "
                             "ranks share each batch and wait for each other in every layer")
        if self.balance.enabled and self.compression != "none":
            raise ValueError(f"balance.enabled: balanced steps sum gradients in one plain all-reduce; compression "
                             f"{self.compression} does not apply to it (use compression none)")
        if self.strategy != "ddp":
            self._compression_on_replicas()
        return self

    def _compression_on_replicas(self) -> None:
        """fsdp / hybrid compress only the all-reduce across ``mesh.replicate`` (HSDP), with int8 or bf16."""
        if self.hierarchical:
            raise ValueError(f"hierarchical: strategy {self.strategy} with mesh.replicate > 1 (HSDP) is hierarchical "
                             "already: a reduce-scatter inside each replica, an all-reduce across replicas; set "
                             "mesh.replicate to the number of nodes instead")
        if self.compression == "none":
            return
        if self.compression in ("int8", "bf16"):
            if (self.mesh.replicate or 1) > 1:
                return
            raise ValueError(f"compression: {self.compression} with strategy {self.strategy} compresses the all-reduce "
                             "across replicas (HSDP); set mesh.replicate >= 2 (FSDP2's reduce-scatter inside a "
                             "replica stays fp32)")
        raise ValueError(f"compression: {self.compression} needs whole gradients (strategy ddp); strategy "
                         f"{self.strategy} reduces flat gradient shards: use int8 or bf16 with mesh.replicate >= 2")


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
    name: str = Field(description="the run directory's name under runs_dir")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy accepts seeds in [0, 2**32 - 1]")
    runs_dir: str = "runs"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    _source: str = PrivateAttr("<config>")  # the run file's name, for messages raised after validation
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("name")
    @classmethod
    def _one_directory_name(cls, name: str) -> str:
        """The name becomes one directory under runs_dir: no separators, and neither '.' nor '..'."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"{name!r} must be one directory name of letters, digits, '_', '.' and '-' "
                             "(not '.' or '..')")
        return name

    @model_validator(mode="after")
    def _pretrained_models_bring_their_tokenizer(self) -> RunConfig:
        chosen = self.data.tokenizer.model_fields_set - {"max_length"}
        if self.model.hf is not None and chosen:
            raise ValueError(f"data.tokenizer: {', '.join(sorted(chosen))} cannot be set with model.hf: a pretrained "
                             "model reads text with its own tokenizer; only data.tokenizer.max_length applies")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def source(self) -> str:
        """The run file this config came from (its name), for messages about its fields."""
        return self._source


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}
_shortener = reprlib.Repr()  # error messages quote values, never a whole list or a long string
_shortener.maxstring = _shortener.maxother = 60
_short = _shortener.repr


def describe_value(value: Any) -> str:
    """A value as the run file spells it, kept short: `the string '32'`, `the boolean true`, `a list`."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, int | float):
        return f"the number {_short(value)}"
    if value is None:
        return "an empty value (null)"
    return {list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def describe_error(err: dict[str, Any]) -> str:
    """One readable phrase for one pydantic error."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "literal_error":
        allowed = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{_short(value)} is not one of {allowed}"
    if kind == "missing":
        return "is required"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {describe_value(value)}"
    if err["msg"].startswith("Input should"):
        return f"{err['msg'].removeprefix('Input ')}, got {describe_value(value)}"
    return err["msg"].removeprefix("Value error, ")


def format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc, phrase = err["loc"], describe_error(err)
        if err["type"] == "extra_forbidden":
            loc, phrase = loc[:-1], f"unknown key {_short(str(loc[-1]))}"
        where = ".".join(str(p) for p in loc)
        parts.append(f"{where}: {phrase}" if where else phrase)
    return f"{source}: " + "; ".join(parts)


def parse_value(text: str) -> Any:
    """Parse a `--set` value the way the run file would (`50` -> int, `bf16` -> str, `[1,2]` -> list)."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to the raw config mapping, creating sections as needed."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    key, _, value = assignment.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise UserError(f"--set {assignment!r}: {key.strip()!r} has an empty name; write dotted names, "
                        "e.g. train.max_steps=50")
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[path[-1]] = parse_value(value)


def yaml_error_line(exc: yaml.YAMLError, text: str) -> str:
    """`line N: what is wrong` for a PyYAML error, whether it carries a mark or a character position."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return f"line {line}: character #x{exc.character:04x} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
    return f"{where}{problem}" if isinstance(exc, RunFileError) else f"{where}not valid YAML ({problem})"


def read_run_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a run file; every problem becomes a one-line `UserError` naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such run file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path.name}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path.name}: {yaml_error_line(exc, text)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path.name}: the top level must be a mapping of sections, got {describe_value(raw)}")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run file; every problem becomes a `UserError` naming the file."""
    path = Path(path)
    raw = read_run_file(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source=path.name)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None
    cfg._source = source
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
