"""World size > 1: model and optimiser state through torch.distributed.checkpoint (DCP), sharded per rank.

`get_state_dict` / `set_state_dict` turn DDP and FSDP2 models and their optimisers into FQN-keyed state
dicts (DTensor shards for FSDP2); DCP writes each rank's part into ``dcp/`` and reshards on load (a different
world size, or one process). Only tensors go through DCP: the optimiser's structure (param_groups, non-tensor
values) is JSON in optimizer.json, so DCP never needs to pickle a value. DCP's own ``.metadata`` file *is* a
pickle; it is read here with an unpickler that accepts only DCP's metadata classes (a stock reader would run
``pickle.load`` on it), and a checkpoint whose metadata declares pickled byte entries is refused, since DCP
would load those with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from fullchain.distributed.tensor_parallel import (
    FusedLayout,
    LogicalLoadPlanner,
    LogicalSavePlanner,
    as_logical,
    fused_layouts,
    logical_shape,
    physical_state,
)
from fullchain.train.checkpoint.files import decode, encode, tensor_refs

DCP_DIR = "dcp"

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's .metadata")


class SafeReader(FileSystemReader):
    """A `FileSystemReader` whose metadata is read with `_MetadataUnpickler` and holds tensors only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise ValueError(f"{path}: entries {pickled[:5]} are pickled objects; refusing to load them")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def new_group() -> dist.ProcessGroup:
    """A private gloo group for the writer thread, so its collectives never interleave with training's."""
    return dist.new_group(backend="gloo")


def make_stager() -> DefaultStager:
    # synchronous staging into plain CPU memory; the stager keeps its CPU buffers for the next save
    return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def stage(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
          stager: DefaultStager) -> tuple[dict[str, Any], Any]:
    """CPU copy of this rank's model + optimiser tensors (DTensors stay DTensors) and the optimiser's structure.

    Fused parameters (`fullchain.distributed.tensor_parallel`) go to DCP in their ordinary shape."""
    if optimizer is None:
        model_sd, optim_tree, optim_tensors = get_model_state_dict(model), None, {}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        optim_tree, optim_tensors = encode(optim_sd)
    staged = stager.stage({"model": model_sd, "optimizer": optim_tensors})
    layouts = fused_layouts(model)
    logical = {"model": as_logical(staged["model"], layouts),
               "optimizer": as_logical(staged["optimizer"], _optimizer_layouts(optim_tree, layouts))}
    return logical, optim_tree


def _state_layout(path: tuple, layouts: dict[str, FusedLayout]) -> FusedLayout | None:
    """The fused layout of the parameter an optimiser state path (``state.<fqn>.<name>``) belongs to, if any."""
    return layouts.get(path[1]) if len(path) > 2 and path[0] == "state" else None


def _optimizer_layouts(optim_tree: Any, layouts: dict[str, FusedLayout]) -> dict[str, FusedLayout]:
    """``{encoded optimiser key: layout}`` of the state of fused parameters (`tensor_parallel`)."""
    if optim_tree is None or not layouts:
        return {}
    return {key: layout for path, key in tensor_refs(optim_tree) if (layout := _state_layout(path, layouts))}


def save(staged: dict[str, Any], directory: Path, group: dist.ProcessGroup) -> None:
    dcp.save(staged, storage_writer=FileSystemWriter(str(directory), sync_files=True), process_group=group,
             planner=LogicalSavePlanner())


def _mismatch(what: str, missing: set[str], unexpected: set[str]) -> str:
    return (f"{what} does not fit the checkpoint: missing in the checkpoint {sorted(missing)[:10]}, "
            f"not in this {what} {sorted(unexpected)[:10]}")


def load(directory: Path, optim_tree: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         group: dist.ProcessGroup | None) -> None:
    """Load a DCP checkpoint in place into `model` / `optimizer` (any world size, including one process)."""
    metadata = SafeReader(str(directory)).read_metadata()
    saved = metadata.state_dict_metadata
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    layouts = fused_layouts(model)
    saved_model = {k[len("model."):] for k in saved if k.startswith("model.")}
    if set(model_sd) != saved_model:
        raise ValueError(_mismatch("model", set(model_sd) - saved_model, saved_model - set(model_sd)))
    target: dict[str, Any] = {"model": model_sd, "optimizer": {}}
    if optimizer is not None:
        if optim_tree is None:
            raise ValueError("the checkpoint holds no optimizer state")
        for path, key in tensor_refs(optim_tree):
            md = saved.get(f"optimizer.{key}")
            if not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"optimizer tensor {key!r} is listed in optimizer.json but missing from dcp/")
            current: Any = optim_sd
            for part in path:
                if isinstance(current, dict):
                    current = current.get(part)
                elif isinstance(current, list | tuple) and isinstance(part, int) and part < len(current):
                    current = current[part]
                else:
                    current = None
            layout = _state_layout(path, layouts)
            if isinstance(current, torch.Tensor) and tuple(logical_shape(current, layout)) == tuple(md.size):
                target["optimizer"][key] = current
            else:  # state this optimiser has not created yet: a full (unsharded) tensor of the saved shape
                fresh = torch.empty(md.size, dtype=md.properties.dtype)
                target["optimizer"][key] = fresh if layout is None else fresh.view(layout.physical)
    to_read = {"model": as_logical(model_sd, layouts),
               "optimizer": as_logical(target["optimizer"], _optimizer_layouts(optim_tree, layouts))}
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(to_read, storage_reader=SafeReader(str(directory)), process_group=group, no_dist=group is None,
                 planner=LogicalLoadPlanner())
    if optimizer is None:
        set_model_state_dict(model, model_sd)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict=decode(optim_tree, target["optimizer"]))


def load_full(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict[str, Any],
              optim_sd: dict[str, Any] | None) -> None:
    """Load a single-process checkpoint (full tensors, torch's optimiser format) into a distributed model."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    layouts = fused_layouts(model)
    model_sd = physical_state(model_sd, layouts)
    if optimizer is None or optim_sd is None:
        set_model_state_dict(model, model_sd, options=options)
        return
    _, template = get_state_dict(model, optimizer)
    fqns = [fqn for group in template["param_groups"] for fqn in group["params"]]
    n_saved = sum(len(g["params"]) for g in optim_sd["param_groups"])
    if n_saved != len(fqns):
        raise ValueError(f"the checkpoint's optimizer has {n_saved} parameters, this one {len(fqns)}")
    by_fqn = {
        "state": {fqns[i]: physical_state(s, dict.fromkeys(s, layouts.get(fqns[i])))
                  for i, s in optim_sd["state"].items()},
        # only the settings this optimiser's groups hold: a scheduler's ``initial_lr`` is saved with the Trainer's
        # optimiser, and torch's loader looks every saved key up in the current groups
        "param_groups": [{**{k: v for k, v in g.items() if k in current}, "params": [fqns[i] for i in g["params"]]}
                         for g, current in zip(optim_sd["param_groups"], optimizer.param_groups, strict=True)],
    }
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=by_fqn, options=options)
