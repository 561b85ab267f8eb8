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
way). `PlacedOptimizer` steps both optimisers as one (a
plain loop's optimiser; the Trainer holds one torch optimiser, so placed training is not wired into it yet).

TorchRec plans embedding sharding across GPUs (and needs fbgemm kernels); nothing in torch plans CPU vs
accelerator placement of one model, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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

    Works on a model built on the meta device: only shapes and dtypes are read.
    """
    groups: list[Group] = []
    placed: set[int] = set()
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
    plan = Plan(groups, accelerator, budget_bytes)
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
    model.to(device)
    for module in tables.values():
        module.to("cpu")
        module.sparse = True  # only the looked-up rows get a gradient (what SparseAdam steps)
        module.register_forward_pre_hook(lambda _, args: _to(torch.device("cpu"))(args))
        module.register_forward_hook(lambda _, __, output: _to(device)(output))
    return model


class PlacedOptimizer:
    """The main optimiser over the dense parameters and SparseAdam over the tables, stepped as one."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.sparse.param_groups

    def step(self) -> None:
        self.dense.step()
        self.sparse.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.sparse.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])


def placed_optimizer(model: nn.Module, plan: Plan, make_dense: Any, lr: float) -> PlacedOptimizer:
    """`make_dense(params)` for the dense parameters, SparseAdam(lr) for the planned tables."""
    sparse = set(plan.sparse_names)
    table_params = [m.weight for n, m in model.named_modules() if n in sparse]
    ids = {id(p) for p in table_params}
    dense_params = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return PlacedOptimizer(make_dense(dense_params), torch.optim.SparseAdam(table_params, lr=lr))


def plan_for_run(cfg: Any) -> Plan:
    """`ds plan RUN.yaml`: the run's model, built on the meta device (no weights allocated) with the sizes its
    data gives, planned for the accelerator it would train on; the budget is ``distributed.placement.
    accelerator_memory_gb``, else the CUDA device's memory, else none (a CPU-only machine plans for a GPU)."""
    from fullchain.data import build_data
    from fullchain.errors import UserError
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
    placement = cfg.distributed.placement
    budget = placement.accelerator_memory_gb
    if budget is None and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory / 1024**3
    return plan_placement(model, "cuda", int(budget * 1024**3) if budget is not None else None,
                          placement.sparse_threshold_mb, cfg.train.optimizer.name)
