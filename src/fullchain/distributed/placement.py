"""Placement planner: sparse parts (big embedding tables) on the CPU with a sparse optimiser, dense parts on the
accelerator with the main optimiser, activations and gradients moved across the boundary.

A recommendation model's embedding table can hold millions of rows, of which one batch touches a few hundred:
on the accelerator it costs its full size three times over (weights and Adam's two moments) and a dense
gradient of the whole table every step. `plan_placement` finds such tables (``nn.Embedding`` /
``nn.EmbeddingBag`` built with ``sparse=True``, or any table of at least ``sparse_threshold_mb``), keeps them
in CPU memory with ``torch.optim.SparseAdam`` (it updates only the looked-up rows), and puts everything else
on the accelerator; it reports each group's device, bytes (weights + gradients + optimiser state) and the
reason, and whether the accelerator part fits its budget (given, so a CPU-only machine plans for a GPU).
`place` applies a plan: it moves the modules, turns big tables' gradients sparse, and adds hooks that move a
table's input ids to the CPU and its output to the accelerator (autograd carries gradients back the same
way). `PlacedOptimizer` steps both optimisers as one ``torch.optim.Optimizer``, so the Trainer's LR schedule,
loss scaling, clipping and checkpoints work on it unchanged.

`ds train` trains with the plan when ``distributed.placement.enabled`` (`place_for_training`: one process; the
tables get no weight decay, SparseAdam has none); `ds plan` prints it either way. On a CPU-only machine the
"accelerator" is the CPU: nothing moves, but the sparse path (sparse gradients, SparseAdam) is the same.

TorchRec plans embedding sharding across GPUs (and needs fbgemm kernels); nothing in torch plans CPU vs
accelerator placement of one model, hence this module.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fullchain.distributed.strategy import LocalStrategy
from fullchain.errors import UserError

TABLES = (nn.Embedding, nn.EmbeddingBag)
MB = 1024 * 1024


@dataclass
class Group:
    """One parameter group of the plan: a module's parameters, where they live and why."""

    name: str
    kind: str  # "sparse" or "dense"
    device: str
    parameters: int
    bytes: int  # weights + gradients + optimiser state
    optimizer: str
    reason: str


@dataclass
class Plan:
    groups: list[Group]
    accelerator: str
    budget_bytes: int | None
    notes: list[str] = field(default_factory=list)

    def bytes_on(self, device: str) -> int:
        return sum(g.bytes for g in self.groups if g.device == device)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.bytes_on(self.accelerator) <= self.budget_bytes

    @property
    def sparse_names(self) -> list[str]:
        return [g.name for g in self.groups if g.kind == "sparse"]

    def as_dict(self) -> dict[str, Any]:
        return {"accelerator": self.accelerator, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "bytes": {d: self.bytes_on(d) for d in sorted({g.device for g in self.groups})},
                "groups": [g.__dict__ for g in self.groups], "notes": self.notes}


def _state_factor(optimizer: str) -> int:
    """Copies of the weights an optimiser keeps (Adam/AdamW/SparseAdam: two moments; SGD: momentum)."""
    return {"sgd": 1}.get(optimizer, 2)


def plan_placement(model: nn.Module, accelerator: str = "cuda", budget_bytes: int | None = None,
                   sparse_threshold_mb: float = 64.0, optimizer: str = "adamw") -> Plan:
    """Which of `model`'s modules go to the CPU (sparse tables) and which to `accelerator` (the rest).

    Works on a model built on the meta device: only shapes and dtypes are read. A table whose weight another
    layer shares (a language model's tied output head) stays dense: that layer's gradient covers every row.
    """
    groups: list[Group] = []
    notes: list[str] = []
    placed: set[int] = set()
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, module in model.named_modules():
        if not isinstance(module, TABLES):
            continue
        weight = module.weight
        size = weight.numel() * weight.element_size()
        if module.sparse:
            reason = "sparse=True: a step touches only the looked-up rows"
        elif size >= sparse_threshold_mb * MB:
            reason = f"table of {size / MB:.1f} MB >= sparse_threshold_mb {sparse_threshold_mb:g}"
        else:
            continue
        if len(users[id(weight)]) > 1:
            shared = ", ".join(u for u in users[id(weight)] if u != f"{name}.weight")
            notes.append(f"{name} stays dense although {reason.split(':')[0]}: its weight is shared with {shared}")
            continue
        placed.add(id(weight))
        # SparseAdam keeps dense moments; the gradient is sparse (rows of one batch), so it is not counted.
        groups.append(Group(name, "sparse", "cpu", weight.numel(), size * (1 + _state_factor("sparseadam")),
                            "sparseadam", reason))
    dense = [(n, p) for n, p in model.named_parameters() if id(p) not in placed]
    if dense:
        count = sum(p.numel() for _, p in dense)
        size = sum(p.numel() * p.element_size() for _, p in dense)
        reason = "dense layers: every step updates all of them" if groups else "no sparse table: all dense"
        groups.append(Group("<dense: " + ", ".join(_top_level(n for n, _ in dense)) + ">", "dense", accelerator,
                            count, size * (2 + _state_factor(optimizer)), optimizer, reason))
    plan = Plan(groups, accelerator, budget_bytes, notes)
    everything = sum(p.numel() * p.element_size() for p in model.parameters()) * (2 + _state_factor(optimizer))
    plan.notes.append(f"everything on {accelerator} with {optimizer}: {everything / MB:.1f} MB")
    if budget_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        plan.notes.append(f"{accelerator} part {plan.bytes_on(accelerator) / MB:.1f} MB {verdict} the budget of "
                          f"{budget_bytes / MB:.1f} MB" + ("" if everything <= budget_bytes or not plan.fits
                                                           else "; everything on it would not"))
    return plan


def _top_level(names) -> list[str]:
    seen: list[str] = []
    for n in names:
        head = n.split(".")[0]
        if head not in seen:
            seen.append(head)
    return seen


def _to(device: torch.device):
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple | list):
            return type(value)(move(v) for v in value)
        return value
    return move


def place(model: nn.Module, plan: Plan, device: torch.device | str) -> nn.Module:
    """Apply `plan`: dense parts to `device`, sparse tables stay on the CPU with sparse gradients; a table's
    inputs move to the CPU before it runs and its output to `device` after."""
    device = torch.device(device)
    sparse = set(plan.sparse_names)
    tables = {name: module for name, module in model.named_modules() if name in sparse}
    _move_all_but(model, tables, device)
    for module in tables.values():
        module.to("cpu")
        module.sparse = True  # only the looked-up rows get a gradient (what SparseAdam steps)
        module.register_forward_pre_hook(lambda _, args: _to(torch.device("cpu"))(args))
        module.register_forward_hook(lambda _, __, output: _to(device)(output))
    return model


def _move_all_but(model: nn.Module, tables: dict[str, nn.Module], device: torch.device) -> None:
    """`model.to(device)` with `tables` left where they are: a table bigger than the device never visits it.
    Each is unhooked from its parent for the move (``.to`` skips an empty child slot) and put back."""
    if "" in tables:  # the model is one table: nothing dense to move
        return
    slots = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], table)
             for name, table in tables.items()]
    for parent, child, _ in slots:
        setattr(parent, child, None)
    try:
        model.to(device)
    finally:
        for parent, child, table in slots:
            setattr(parent, child, table)


class PlacedOptimizer(torch.optim.Optimizer):
    """The main optimiser over the dense parameters and SparseAdam over the tables, stepped as one.

    A real ``torch.optim.Optimizer`` (LR schedulers and ``GradScaler`` take nothing else) whose ``param_groups``
    are the two inner optimisers' own group dicts, so a schedule's learning rate reaches both, and loss scaling
    unscales (and checks) the tables' sparse gradients with the rest.
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        super().__init__([{"params": g["params"]} for g in dense.param_groups + sparse.param_groups], {})
        self.dense, self.sparse = dense, sparse
        self._share_inner()

    def _share_inner(self) -> None:
        """Point at the inner optimisers' groups and state (their load_state_dict replaces both)."""
        self.param_groups = self.dense.param_groups + self.sparse.param_groups
        self.state = ChainMap(self.dense.state, self.sparse.state)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self.dense.step(closure)  # a closure (re)computes the loss and every gradient once
        self.sparse.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise UserError("distributed.placement.enabled: this optimizer state was saved without placement; "
                            "resume with the placement setting the run was saved with, or start a new run")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        self._share_inner()


def placed_optimizer(model: nn.Module, plan: Plan, make_dense: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                     lr: float) -> torch.optim.Optimizer:
    """`make_dense(params)` for the dense parameters, SparseAdam(lr) for the planned tables, as one optimiser
    (just `make_dense`'s when the plan holds no table)."""
    sparse = set(plan.sparse_names)
    table_params = [m.weight for n, m in model.named_modules() if n in sparse]
    ids = {id(p) for p in table_params}
    dense = make_dense([p for p in model.parameters() if id(p) not in ids and p.requires_grad])
    return PlacedOptimizer(dense, torch.optim.SparseAdam(table_params, lr=lr)) if table_params else dense


class PlacedStrategy(LocalStrategy):
    """One process whose model `place` has already spread over the CPU and the device: wrapping leaves it
    where it is (`LocalStrategy` would move the tables back onto the device)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


def require_single_process(processes: int) -> None:
    """Placed training is one process: refuse several with one line naming the setting."""
    if processes > 1:
        raise UserError(f"distributed.placement.enabled: placed training runs in one process (a big table in host "
                        f"memory, the rest on one device); {processes} processes were asked for: launch one, or set "
                        "distributed.placement.enabled: false")


def place_for_training(model: nn.Module, cfg: Any, device: torch.device,
                       make_dense: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
                       ) -> tuple[Plan, torch.optim.Optimizer, PlacedStrategy]:
    """`ds train` with ``distributed.placement.enabled``: the run's plan for `device`, applied to `model`, the
    optimiser (`make_dense` over the dense part, SparseAdam at ``train.optimizer.lr`` over the tables) and the
    strategy the Trainer holds."""
    plan = plan_for_model(model, cfg, device.type)
    place(model, plan, device)
    return plan, placed_optimizer(model, plan, make_dense, cfg.train.optimizer.lr), PlacedStrategy(device)


def print_plan(plan: Plan, console: Console) -> None:
    """The plan as `ds plan` and `ds train` print it: a table of groups, bytes per device, the notes."""
    table = Table("parameter group", "device", "parameters", "MB (w+g+opt)", "optimizer", "reason")
    for g in plan.groups:
        table.add_row(g.name, g.device, f"{g.parameters:,}", f"{g.bytes / MB:.1f}", g.optimizer, g.reason)
    console.print(table)
    for device in sorted({g.device for g in plan.groups}):
        console.print(f"{device}: {plan.bytes_on(device) / MB:.1f} MB", highlight=False)
    for note in plan.notes:
        console.print(note, highlight=False)


def plan_for_run(cfg: Any) -> Plan:
    """`ds plan RUN.yaml`: the run's model, built on the meta device (no weights allocated) with the sizes its
    data gives, planned for CUDA (a CPU-only machine plans for a GPU)."""
    from fullchain.data import build_data
    from fullchain.models import build_model, model_args_from_data
    from fullchain.models.targets import TargetOrigin

    if cfg.model.name is None and cfg.model.target is None:
        raise UserError(f"{cfg.source}: model.hf: ds plan reads models built from model.name or model.target")
    bundle = build_data(cfg.data, seed=cfg.seed)
    origin = TargetOrigin(cfg.source)
    args = model_args_from_data(cfg.model.name, bundle.input_spec, cfg.model.args, target=cfg.model.target,
                                origin=origin)
    with torch.device("meta"):
        model = build_model(name=cfg.model.name, target=cfg.model.target, args=args, origin=origin)
    return plan_for_model(model, cfg, "cuda")


def plan_for_model(model: nn.Module, cfg: Any, accelerator: str) -> Plan:
    """The run's plan for `model` on `accelerator`; the budget is ``distributed.placement.accelerator_memory_gb``,
    else the CUDA device's memory, else none (and none when the "accelerator" is the CPU itself)."""
    placement = cfg.distributed.placement
    budget = None
    if accelerator != "cpu":
        budget = placement.accelerator_memory_gb
        if budget is None and torch.cuda.is_available():
            budget = torch.cuda.get_device_properties(0).total_memory / 1024**3
    return plan_placement(model, accelerator, int(budget * 1024**3) if budget is not None else None,
                          placement.sparse_threshold_mb, cfg.train.optimizer.name)
