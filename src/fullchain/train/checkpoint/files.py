"""The on-disk side of checkpoints: layout, pickle-free encoding, durable writes, verification, retention.

Layout of one checkpoint (``checkpoints/step-000500/``, written as ``step-000500.tmp/`` and renamed)::

    meta.json            step, epoch, samples seen, world size, versions, config hash, timings, and the
                         size + sha256 of every other file (written last: the commit marker)
    model.safetensors    tensors of the model state dict (single process)
    model.json           the state dict's structure, tensors as {"__tensor__": key}
    optimizer.safetensors / optimizer.json    the same for the optimizer state dict
    trainer.json (+ trainer.safetensors if it holds tensors)   the Trainer's own state
    trainer-rank<R>.json (world size > 1, ranks other than 0; their own RNG states etc.)
    dcp/                 world size > 1: torch.distributed.checkpoint shards (.metadata, __<rank>_<n>.distcp)

Every file in the directory but meta.json is listed in meta.json with its checksum; a checkpoint holding a file
that is not listed does not verify (nothing unverified is ever loaded). Next to the checkpoints:

    step-000500.tmp/     a save in progress, or a partial one a killed writer left: deleted by the next writer
    .writer.lock         the flock of the one process that writes here
    corrupt-step-000500-20261202T065400Z/    a checkpoint that did not verify, moved aside (with the UTC time
                         of the move) when a resume went past it or a save of the same step would have replaced
                         it: never deleted, overwritten or counted by retention. Renamed in place, not into a
                         subfolder: moving a directory to another parent needs write permission on the directory
                         itself, which an unreadable checkpoint lacks.

Structures go to JSON with three tags so that torch's formats come back exactly: ``{"__tensor__": key}``,
``{"__tuple__": [...]}`` and ``{"__dict__": [[key, value], ...]}`` for dicts with non-string keys (the
optimizer's ``{int: ...}``). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "fullchain-checkpoint/1"
META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_SUFFIX = ".tmp"
CORRUPT_PREFIX = "corrupt-"
_CHUNK = 8 << 20

# ---- names ---------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def committed(directory: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories (``step-N``, never ``*.tmp``), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


# ---- pickle-free structures ----------------------------------------------------------------------

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def encode(obj: Any, copy: Callable[[str, torch.Tensor], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Split a nested structure into a JSON-able tree and a flat ``{key: tensor}`` dict.

    Keys are the path joined with dots (``state.0.exp_avg``; a flat model state dict keeps its own keys).
    `copy(key, tensor)` stages each tensor (e.g. a CPU copy); by default tensors are kept as they are.
    """
    tensors: dict[str, Any] = {}

    def key_for(path: list[str]) -> str:
        key = ".".join(path) or "tensor"
        base, n = key, 1
        while key in tensors:
            key, n = f"{base}#{n}", n + 1
        return key

    def walk(x: Any, path: list[str]) -> Any:
        if isinstance(x, torch.Tensor):
            key = key_for(path)
            tensors[key] = copy(key, x) if copy else x
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in x):
                return {k: walk(v, [*path, k]) for k, v in x.items()}
            for k in x:
                if not (k is None or isinstance(k, str | int | float | bool)):
                    raise TypeError(f"{'.'.join(path) or 'root'}: dict key {k!r} ({type(k).__name__}) cannot be stored")
            return {"__dict__": [[k, walk(v, [*path, str(k)])] for k, v in x.items()]}
        if isinstance(x, list):
            return [walk(v, [*path, str(i)]) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, [*path, str(i)]) for i, v in enumerate(x)]}
        if x is None or isinstance(x, str | bool | int):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        raise TypeError(
            f"{'.'.join(path) or 'root'}: a {type(x).__name__} cannot be stored without pickle "
            "(use tensors, numbers, strings, lists, tuples and dicts)"
        )

    return walk(obj, []), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if len(tree) == 1:
            ((tag, value),) = tree.items()
            if tag == "__tensor__":
                if value not in tensors:
                    raise KeyError(f"tensor {value!r} is referenced but not stored")
                return tensors[value]
            if tag == "__tuple__":
                return tuple(decode(v, tensors) for v in value)
            if tag == "__dict__":
                return {k: decode(v, tensors) for k, v in value}
            if tag == "__float__":
                return float(value)
        return {k: decode(v, tensors) for k, v in tree.items()}
    return tree


def tensor_refs(tree: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, key) of every tensor reference in an encoded tree (paths use the decoded keys)."""
    out: list[tuple[tuple, str]] = []
    if isinstance(tree, list):
        for i, v in enumerate(tree):
            out += tensor_refs(v, (*path, i))
    elif isinstance(tree, dict):
        if len(tree) == 1 and next(iter(tree)) in _TAGS:
            ((tag, value),) = tree.items()
            if tag == "__tensor__":
                out.append((path, value))
            elif tag == "__tuple__":
                for i, v in enumerate(value):
                    out += tensor_refs(v, (*path, i))
            elif tag == "__dict__":
                for k, v in value:
                    out += tensor_refs(v, (*path, k))
        else:
            for k, v in tree.items():
                out += tensor_refs(v, (*path, k))
    return out


def to_json(tree: Any) -> bytes:
    return (json.dumps(tree, allow_nan=False, separators=(",", ":")) + "\n").encode()


# ---- durable writes ------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path, sync: bool = False) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file; with `sync`, also fsync it (the fd is open anyway)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
        if sync:
            os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return hash_file(path, sync=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def remove_tree(path: Path) -> None:
    """Remove a checkpoint directory so that no half-deleted ``step-N`` is ever left: rename, then delete."""
    doomed = path.with_name(path.name + ".del" + TMP_SUFFIX)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def commit_dir(tmp: Path, final: Path) -> None:
    """Atomically publish `tmp` as `final` (replacing an older `final` of the same step) and fsync the parent."""
    fsync_dir(tmp)
    replaced = None
    if final.exists():
        replaced = final.with_name(final.name + ".old" + TMP_SUFFIX)
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def retention(directory: Path, keep_last: int, keep_every: int | None, protect: Path,
              trusted: Callable[[Path], bool]) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep_last`, except multiples of `keep_every`.

    Only checkpoints that `trusted` accepts (they verify, or this process wrote them) are counted or deleted:
    one that does not verify stays where it is, for whoever looks into what went wrong.
    """
    kept, doomed = 0, []
    for step, path in reversed(committed(directory)):
        if kept < keep_last:
            if path == protect or trusted(path):
                kept += 1
        elif path != protect and not (keep_every and step % keep_every == 0) and trusted(path):
            doomed.append(path)
    for path in doomed:
        remove_tree(path)
    return doomed


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not verify to ``corrupt-<name>-<UTC time>`` beside it; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{stamp}"), 1
    while os.path.lexists(target):  # rename() would replace an empty directory of that name
        n += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{stamp}-{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


# ---- verification --------------------------------------------------------------------------------


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint; raises ValueError with a readable reason."""
    meta_path = path / META
    if not meta_path.is_file():
        raise ValueError(f"missing {META} (the save never committed, or the file was deleted)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{META} is unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{META} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{META} has format {found!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{META} lacks its 'files' table or 'step'")
    return meta


REQUIRED = {"single": ("model.json", "optimizer.json", "trainer.json"),
            "dcp": ("optimizer.json", "trainer.json", "dcp/.metadata")}


def _unreadable(exc: OSError, name: str | None = None) -> str:
    return f"cannot read {name or exc.filename or 'the checkpoint'} ({exc.strerror or exc})"


def unlisted_files(path: Path, listed: Iterable[str]) -> list[str]:
    """Files (and symlinks) under `path`, relative POSIX names, that are neither meta.json nor in `listed`.

    Raises OSError when a directory cannot be listed (`Path.rglob` would skip it silently)."""
    known = {*listed, META}

    def fail(exc: OSError) -> None:
        raise exc

    found = []
    for root, dirs, names in os.walk(path, onerror=fail):
        here = Path(root)
        for name in [*names, *(d for d in dirs if (here / d).is_symlink())]:
            if (rel := (here / name).relative_to(path).as_posix()) not in known:
                found.append(rel)
    return sorted(found)


def verify(path: Path) -> list[str]:
    """Problems of one checkpoint directory: empty when it is complete, every file in it is listed in meta.json
    and every checksum matches. What cannot be read (permissions, I/O errors) is a problem, not an exception."""
    path = Path(path)
    try:
        if not path.is_dir():
            return [f"{path} is not a directory"]
        meta = read_meta(path)
    except ValueError as exc:
        return [str(exc)]
    except OSError as exc:
        return [_unreadable(exc)]
    problems = []
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != meta["step"]:
        problems.append(f"{META} says step {meta['step']} but the directory is {path.name}")
    kind = meta.get("kind")
    if kind not in REQUIRED:
        return [*problems, f"{META} has unknown kind {kind!r}"]
    problems += [f"{META} does not list {name}" for name in REQUIRED[kind] if name not in meta["files"]]
    root = path.resolve()
    for name, info in meta["files"].items():
        file = (path / name).resolve()
        if name == META or root not in file.parents:
            problems.append(f"{META} lists a file outside the checkpoint: {name!r}")
            continue
        try:
            if not file.is_file():
                problems.append(f"missing file {name}")
                continue
            size = file.stat().st_size
            if size != info["bytes"]:
                problems.append(f"size mismatch for {name}: {size} bytes, expected {info['bytes']} (truncated?)")
            elif hash_file(file)["sha256"] != info["sha256"]:
                problems.append(f"checksum mismatch for {name} (sha256 differs from {META})")
        except OSError as exc:
            problems.append(_unreadable(exc, name))
        except (KeyError, TypeError):
            problems.append(f"{META} entry for {name} lacks 'bytes'/'sha256'")
    try:
        unlisted = unlisted_files(path, meta["files"])
    except OSError as exc:
        problems.append(_unreadable(exc))
    else:
        if unlisted:
            problems.append(f"files not listed in {META}: {', '.join(unlisted[:10])}"
                            f"{f' and {len(unlisted) - 10} more' if len(unlisted) > 10 else ''}")
    return problems
