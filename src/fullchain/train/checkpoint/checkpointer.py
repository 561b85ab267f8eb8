"""The Checkpointer: asynchronous, atomic, checksummed saves; resume from the newest checkpoint that verifies.

`save()` copies the state into CPU buffers (reused from one save to the next) and returns; a writer thread
writes ``step-N.tmp/``, fsyncs every file and the directory, writes meta.json (sizes and sha256 of all
files) last, renames the directory to ``step-N/`` and fsyncs the parent, then applies retention. One save
is in flight at most: the next `save()` waits for it first, and a failure is raised from that call or from
`wait()`. One process (rank 0) per directory writes: an ``flock`` on ``.writer.lock`` refuses a second one.

A checkpoint that does not verify is never deleted or overwritten: `resume_point` refuses to start over when
checkpoints exist and none verifies (unless allowed), and moves the invalid ones it passes aside; retention
counts and deletes only checkpoints that verified or that this process wrote; a save whose step directory
already holds an invalid checkpoint moves that one aside first.

Why by hand: torch.distributed.checkpoint (used here for world size > 1) commits by writing ``.metadata``
last but checksums nothing and does not publish a directory atomically, and its single-process format is a
pickle; Lightning's and plain ``torch.save`` checkpoints are single files written in place.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import queue
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fullchain.train.checkpoint import files as F
from fullchain.train.checkpoint.state import CheckpointError, CheckpointWarning, NoValidCheckpoint, TrainingState
from fullchain.versions import library_versions

LOCK = ".writer.lock"
_LIVE: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _finish_in_flight_saves() -> None:
    """The writer is a daemon thread; at interpreter exit, let a save in flight commit instead of cutting it."""
    for checkpointer in list(_LIVE):
        checkpointer._idle.wait()
        if checkpointer._error is not None:
            warnings.warn(str(checkpointer._error), CheckpointWarning, stacklevel=1)


def _sharded():
    """The DCP side (world size > 1), imported on first use: torch.distributed.checkpoint takes half a second to
    import, which every single-process `ds` command would otherwise pay."""
    from fullchain.train.checkpoint import sharded

    return sharded


def _dcp_exception() -> type[BaseException]:
    """DCP's CheckpointException (it derives from BaseException); an ``except`` clause evaluates this only while
    an exception is being handled, so naming it there imports nothing on the happy path."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _dcp_exception()):  # its str() is a traceback per rank; keep the causes
        return "; ".join(f"rank {rank}: {_describe(failure[0] if isinstance(failure, tuple) else failure)}"
                         for rank, failure in exc.failures.items())
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"[{errno.errorcode.get(exc.errno, exc.errno)}] {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Job:
    step: int
    kind: str  # "single" or "dcp"
    parts: dict[str, tuple[bytes, dict[str, torch.Tensor]]]  # file stem -> (structure JSON, staged tensors)
    trainer: dict[str, Any]
    staged: dict[str, Any] | None = None  # dcp: this rank's staged state dict
    stats: dict[str, float] = field(default_factory=dict)


class Checkpointer:
    """Saves and loads checkpoints under `directory` (see the module docstring and files.py for the layout).

    With ``world_size > 1`` every rank constructs it (it creates a private gloo process group) and calls
    `save`, `wait`, `latest_valid`, `resume_point` and `load` together: these are collective.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int | None = None,
                 async_save: bool = True, config_hash: str = "", world_size: int = 1, rank: int = 0):
        if keep_last < 1:
            raise CheckpointError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise CheckpointError(f"checkpoint keep_every must be >= 1 or unset, got {keep_every}")
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self.config_hash = config_hash
        self.world_size, self.rank = world_size, rank
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._idle = threading.Event()  # set while no save is in flight
        self._idle.set()
        self._error: CheckpointError | None = None
        self._stats: dict[str, float] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._seen_keys: set[str] = set()
        self._seen_storages: set[int] = set()
        self._lock_fd: int | None = None
        self._verified: set[Path] = set()  # resolved paths that verified in this process or that it wrote
        self._rejected: set[Path] = set()  # resolved paths that retention found invalid (checked once)
        self._closed = False
        self._group = None
        self._stager = None
        if world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise CheckpointError(f"world_size={world_size} needs an initialised torch.distributed process group")
            if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
                raise CheckpointError(
                    f"Checkpointer(world_size={world_size}, rank={rank}) does not match the process group "
                    f"(world size {dist.get_world_size()}, rank {dist.get_rank()})")
            self._group = _sharded().new_group()
            self._stager = _sharded().make_stager()

    # ---- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainingState, *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stage `state` in CPU memory and persist it in the background (or now, with ``async_save=False``).

        Raises `CheckpointError` for a failure of the previous save (or, synchronously, of this one).
        """
        start = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - start
        if self._closed:
            raise CheckpointError(f"{self.directory}: save() after close()")
        try:
            job = self._stage_dcp(step, state, model, optimizer) if self._group is not None else \
                self._stage_single(step, state, model, optimizer)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint of step {step}: the training state cannot be stored: {exc}") from exc
        staged = time.perf_counter()
        job.stats = {"step": step, "wait_s": waited, "staging_s": staged - start, "blocked_s": staged - start,
                     "persist_s": float("nan"), "bytes": float("nan")}
        self._stats = job.stats
        if self.async_save:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="fullchain-checkpoint-writer",
                                                daemon=True)
                self._writer.start()
                _LIVE.add(self)
            self._idle.clear()
            self._jobs.put(job)  # a long-lived writer: no thread start (and its GIL hand-over) per save
        else:
            self._run(job)
            job.stats["blocked_s"] = time.perf_counter() - start
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed; raise `CheckpointError` if it (or an earlier one) failed."""
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the save in flight and release the directory lock and the staging buffers."""
        try:
            self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._jobs.put(None)
                self._writer.join()
                self._writer = None
                _LIVE.discard(self)
            self._buffers.clear()
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @property
    def last_save_stats(self) -> dict[str, float]:
        """Of the latest save: staging_s (how long save() blocked, wait_s of it for the previous save),
        persist_s (background write, NaN until committed), bytes (all files)."""
        return dict(self._stats)

    def _join(self) -> None:
        self._idle.wait()

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            finally:
                self._idle.set()

    # staging runs in the caller's thread; everything after it in the writer thread

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Async: a private CPU copy of `t`, in a buffer kept for the next save. Sync: `t` itself when
        safetensors can write it as it is (CPU, contiguous, sharing no memory with another tensor)."""
        t = t.detach()
        if not self.async_save:
            ptr = t.untyped_storage().data_ptr()
            if t.device.type == "cpu" and t.is_contiguous() and ptr not in self._seen_storages:
                self._seen_storages.add(ptr)
                return t
            return t.to("cpu", memory_format=torch.contiguous_format, copy=True)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        self._buffers[key] = buf
        self._seen_keys.add(key)
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf

    def _stage_single(self, step: int, state: TrainingState, model: torch.nn.Module | None,
                      optimizer: torch.optim.Optimizer | None) -> _Job:
        model_sd = state.model if state.model is not None else (model.state_dict() if model is not None else None)
        if model_sd is None:
            raise ValueError("neither state.model nor model= was given")
        optim_sd = state.optimizer
        if optim_sd is None and optimizer is not None:
            optim_sd = optimizer.state_dict()
        self._seen_keys, self._seen_storages = set(), set()
        parts = {}
        for stem, obj in (("model", model_sd), ("optimizer", optim_sd), ("trainer", state.trainer)):
            tree, tensors = F.encode(obj, copy=lambda key, t, stem=stem: self._copy(f"{stem}/{key}", t))
            parts[stem] = (F.to_json(tree), tensors)
        for key in set(self._buffers) - self._seen_keys:
            del self._buffers[key]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies above
        return _Job(step, "single", parts, state.trainer)

    def _stage_dcp(self, step: int, state: TrainingState, model: torch.nn.Module | None,
                   optimizer: torch.optim.Optimizer | None) -> _Job:
        if model is None:
            raise ValueError(f"world size {self.world_size} saves through torch.distributed.checkpoint: "
                             "pass model= (and optimizer=) to save()")
        staged, optim_tree = _sharded().stage(model, optimizer, self._stager)
        tree, tensors = F.encode(state.trainer, copy=lambda _, t: t.detach().to("cpu", copy=True))
        stem = "trainer" if self.rank == 0 else f"trainer-rank{self.rank}"
        parts = {stem: (F.to_json(tree), tensors)}
        if self.rank == 0:
            parts["optimizer"] = (F.to_json(optim_tree), {})
        return _Job(step, "dcp", parts, state.trainer, staged=staged)

    def _run(self, job: _Job) -> None:
        try:
            (self._persist_dcp if job.kind == "dcp" else self._persist_single)(job)
        except CheckpointError as exc:
            self._error = exc
        except BaseException as exc:  # never lose a writer's failure: it is raised from wait()
            error = CheckpointError(f"checkpoint of step {job.step} in {self.directory} failed: {_describe(exc)}")
            error.__cause__ = exc
            self._error = error

    def _paths(self, step: int) -> tuple[Path, Path]:
        final = self.directory / F.step_name(step)
        return final.with_name(final.name + F.TMP_SUFFIX), final

    def _prepare_directory(self) -> None:
        """Once per Checkpointer (rank 0): create the directory, take the writer lock, clear stale ``*.tmp``."""
        if self._lock_fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.directory / LOCK
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"{self.directory}: another process is writing checkpoints here ({lock} is locked); "
                "give each run its own checkpoint directory") from None
        self._lock_fd = fd
        for entry in self.directory.iterdir():  # left by a killed writer; we now hold the lock
            if entry.name.startswith("step-") and entry.name.endswith(F.TMP_SUFFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _write_parts(self, tmp: Path, parts: dict[str, tuple[bytes, dict]], files: dict[str, Any]) -> None:
        for stem, (tree, tensors) in parts.items():
            if tensors:
                files[f"{stem}.safetensors"] = F.write_tensors(tmp / f"{stem}.safetensors", tensors)
            files[f"{stem}.json"] = F.write_bytes(tmp / f"{stem}.json", tree)

    def _meta(self, job: _Job, files: dict[str, Any], persist_s: float) -> bytes:
        meta = {
            "format": F.FORMAT,
            "kind": job.kind,
            "step": job.step,
            "epoch": job.trainer.get("epoch"),
            "samples_seen": job.trainer.get("samples_seen"),
            # where the data stands: micro-batches of this epoch already consumed (the full resume state,
            # RNG, scheduler and loss scaler included, is trainer.json, whose checksum is listed below)
            "data_position": {"epoch": job.trainer.get("epoch"),
                              "micro_batches_in_epoch": job.trainer.get("micro_batches_in_epoch"),
                              "batch_size": job.trainer.get("batch_size")},
            "world_size": self.world_size,
            "config_hash": self.config_hash,
            "versions": library_versions(),
            "saved_unix": round(time.time(), 3),
            "timing": {"staging_s": round(job.stats["staging_s"], 6), "persist_s": round(persist_s, 6)},
            "files": dict(sorted(files.items())),
        }
        return (json.dumps(meta, indent=1) + "\n").encode()

    def _commit(self, job: _Job, tmp: Path, final: Path, files: dict[str, Any], start: float) -> None:
        persist_s = time.perf_counter() - start
        F.write_bytes(tmp / F.META, self._meta(job, files, persist_s))
        if final.exists() and final.resolve() not in self._verified and (problems := self.verify(final)):
            self._set_aside(final, problems)  # a checkpoint of this step that does not verify: keep it
        F.commit_dir(tmp, final)
        job.stats["persist_s"] = time.perf_counter() - start
        job.stats["bytes"] = float(sum(f["bytes"] for f in files.values()))
        self._verified.add(final.resolve())
        try:
            F.retention(self.directory, self.keep_last, self.keep_every, protect=final, trusted=self._trusted)
        except OSError as exc:
            warnings.warn(f"{self.directory}: deleting old checkpoints failed: {_describe(exc)}",
                          CheckpointWarning, stacklevel=1)

    def _trusted(self, path: Path) -> bool:
        """Whether retention may count and delete `path`: it verified in this process or this process wrote it;
        a checkpoint not seen yet is verified now, and one that fails is reported once and left alone."""
        key = path.resolve()
        if key not in self._verified and key not in self._rejected and (problems := self.verify(path)):
            self._rejected.add(key)
            warnings.warn(f"checkpoint {path} does not verify ({'; '.join(problems)}); retention neither counts "
                          "nor deletes it", CheckpointWarning, stacklevel=1)
        return key in self._verified

    def _set_aside(self, path: Path, problems: list[str]) -> Path:
        """Move a checkpoint that does not verify out of the way (`files.set_aside`), with a warning."""
        moved = F.set_aside(path)
        warnings.warn(f"checkpoint {path} does not verify ({'; '.join(problems)}); moved aside to {moved}",
                      CheckpointWarning, stacklevel=1)
        return moved

    def _failed(self, job: _Job, tmp: Path, cause: str) -> CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointError(f"checkpoint of step {job.step} could not be written to {tmp}: {cause}; "
                               f"earlier checkpoints in {self.directory} are untouched")

    def _persist_single(self, job: _Job) -> None:
        start = time.perf_counter()
        tmp, final = self._paths(job.step)
        try:
            self._prepare_directory()
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            files: dict[str, Any] = {}
            self._write_parts(tmp, job.parts, files)
            self._commit(job, tmp, final, files, start)
        except CheckpointError:
            raise
        except Exception as exc:
            raise self._failed(job, tmp, _describe(exc)) from exc

    def _gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def _persist_dcp(self, job: _Job) -> None:
        """All ranks: DCP writes the shards; rank 0 commits only after every rank reported success."""
        start = time.perf_counter()
        tmp, final = self._paths(job.step)
        error = None
        if self.rank == 0:
            try:
                self._prepare_directory()
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / _sharded().DCP_DIR).mkdir(parents=True)
            except (Exception, _dcp_exception()) as exc:
                error = _describe(exc)
        if (error := self._gather(error)[0]) is not None:
            raise self._failed(job, tmp, error) if self.rank == 0 else CheckpointError(
                f"checkpoint of step {job.step}: rank 0 could not create {tmp}: {error}")
        files: dict[str, Any] = {}
        try:
            _sharded().save(job.staged, tmp / _sharded().DCP_DIR, self._group)
            self._write_parts(tmp, job.parts, files)
            for f in sorted((tmp / _sharded().DCP_DIR).iterdir()):
                if f.name.startswith(f"__{self.rank}_"):
                    files[f"{_sharded().DCP_DIR}/{f.name}"] = F.hash_file(f, sync=True)
        except (Exception, _dcp_exception()) as exc:
            error = _describe(exc)
        reports = self._gather((error, files))
        failures = [f"rank {r}: {e}" for r, (e, _) in enumerate(reports) if e is not None]
        if self.rank == 0:
            try:
                if failures:
                    raise RuntimeError("; ".join(failures))
                for _, rank_files in reports:
                    files.update(rank_files)
                for f in sorted(tmp.rglob("*")):  # DCP's .metadata and anything no rank claimed
                    name = f.relative_to(tmp).as_posix()
                    if f.is_file() and name not in files:
                        files[name] = F.hash_file(f, sync=True)
                F.fsync_dir(tmp / _sharded().DCP_DIR)
                self._commit(job, tmp, final, files, start)
            except (Exception, _dcp_exception()) as exc:
                error = self._failed(job, tmp, str(exc) if failures else _describe(exc))
        outcome = self._gather(str(error) if self.rank == 0 and error is not None else None)[0]
        if outcome is not None:
            raise error if isinstance(error, CheckpointError) else CheckpointError(outcome)
        job.stats["persist_s"] = time.perf_counter() - start

    # ---- finding and loading ---------------------------------------------------------------------

    def verify(self, path: str | Path) -> list[str]:
        """Problems of the checkpoint at `path`: empty when every file is present and matches its checksum."""
        problems = F.verify(Path(path))
        if not problems:
            self._verified.add(Path(path).resolve())
        return problems

    def latest_valid(self) -> Path | None:
        """The newest committed checkpoint that verifies; each newer one that does not is skipped with a
        `CheckpointWarning` that says what is wrong. ``*.tmp`` directories are never candidates. Changes
        nothing on disk; `resume_point` is the one to resume from."""

        def newest() -> Path | None:
            chosen, invalid = self._newest_valid()
            for path, problems in invalid:
                warnings.warn(f"skipping checkpoint {path}: {'; '.join(problems)}; trying the next older one",
                              CheckpointWarning, stacklevel=4)
            return chosen

        return self._decide_on_rank0(newest)

    def resume_point(self, allow_fresh: bool = False, opt_in: str = "Checkpointer.resume_point(allow_fresh=True)"
                     ) -> Path | None:
        """The checkpoint a resume starts from: the newest that verifies, or None when there is none at all.

        Each newer checkpoint that does not verify is moved aside (`files.set_aside`) with a `CheckpointWarning`
        naming its new path. When checkpoints exist and none verifies, this raises `NoValidCheckpoint` listing
        each and why, and changes nothing; with `allow_fresh` it moves them all aside and returns None (train
        from step 0). `opt_in` tells the user how to allow that, in the error message.
        """

        def decide() -> Path | None:
            chosen, invalid = self._newest_valid()
            if chosen is None and invalid and not allow_fresh:
                listing = ", ".join(f"{path.name} ({'; '.join(problems)})" for path, problems in invalid)
                raise NoValidCheckpoint(
                    f"none of the checkpoints in {self.directory} verifies: {listing}. Nothing was changed; to "
                    f"train from step 0 instead, with these moved aside (kept, not deleted): {opt_in}")
            try:
                if invalid:
                    self._prepare_directory()  # the writer lock: nobody else writes here while they move
                for path, problems in invalid:
                    self._set_aside(path, problems)
            except OSError as exc:
                raise CheckpointError(f"{self.directory}: cannot move the checkpoints that do not verify aside: "
                                      f"{_describe(exc)}") from None
            return chosen

        return self._decide_on_rank0(decide)

    def _newest_valid(self) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
        """The newest committed checkpoint that verifies, and each newer one that does not with its problems."""
        try:
            found = F.committed(self.directory)
        except OSError as exc:
            raise CheckpointError(f"cannot list the checkpoints in {self.directory}: {_describe(exc)}") from None
        invalid = []
        for _, path in reversed(found):
            if not (problems := self.verify(path)):
                return path, invalid
            invalid.append((path, problems))
        return None, invalid

    def _decide_on_rank0(self, decide: Callable[[], Path | None]) -> Path | None:
        """Run `decide` on rank 0 only; every rank gets its outcome (the path, or the CheckpointError raised)."""
        self._join()
        if self._group is None:
            return decide()
        chosen, error = None, None
        if self.rank == 0:
            try:
                chosen = decide()
            except CheckpointError as exc:
                error = exc
        chosen, error = self._gather((chosen, error))[0]
        if error is not None:
            raise error
        if chosen is not None:  # every rank resumes from the checkpoint rank 0 verified
            self._verified.add(chosen.resolve())
        return chosen

    def load(self, path: str | Path, *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> TrainingState:
        """Read the checkpoint at `path` (verified first unless `verify`/`latest_valid` just did).

        A single-process checkpoint loaded in one process returns its tensors in ``state.model`` /
        ``state.optimizer`` (torch's formats; `model`, if given, is only checked against the keys and shapes).
        Otherwise (a DCP checkpoint, or this Checkpointer has world size > 1) the state is loaded in place into
        `model` / `optimizer`, resharding as needed, and ``state.model`` / ``state.optimizer`` are None.
        """
        path = Path(path)
        self._join()
        if path.resolve() not in self._verified:
            problems = F.verify(path)
            if problems:
                raise CheckpointError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
            self._verified.add(path.resolve())
        meta = F.read_meta(path)
        try:
            return self._load(path, meta, model, optimizer)
        except CheckpointError:
            raise
        except (ValueError, KeyError, RuntimeError, OSError, _dcp_exception()) as exc:
            raise CheckpointError(
                f"checkpoint {path} (step {meta['step']}, written by {meta.get('world_size')} rank(s), kind "
                f"{meta['kind']}) cannot be loaded into this run (world size {self.world_size}): "
                f"{_describe(exc)}") from exc

    def _read_part(self, path: Path, listed: dict[str, Any], stem: str) -> Any:
        """``<stem>.json`` with the tensors of ``<stem>.safetensors``, if meta.json lists one (only listed,
        hence verified, files are read)."""
        tree = json.loads((path / f"{stem}.json").read_bytes())
        weights = f"{stem}.safetensors"
        tensors = F.read_tensors(path / weights) if weights in listed else {}
        return F.decode(tree, tensors)

    def _load(self, path: Path, meta: dict[str, Any], model: torch.nn.Module | None,
              optimizer: torch.optim.Optimizer | None) -> TrainingState:
        listed = meta["files"]
        same_ranks = meta.get("world_size") == self.world_size and f"trainer-rank{self.rank}.json" in listed
        trainer = self._read_part(path, listed, f"trainer-rank{self.rank}" if same_ranks else "trainer")
        if meta["kind"] == "dcp":
            if model is None:
                raise CheckpointError(
                    f"checkpoint {path} was written by {meta.get('world_size')} ranks through "
                    "torch.distributed.checkpoint; pass model= (and optimizer=) to load() to load it in place")
            optim_tree = json.loads((path / "optimizer.json").read_bytes())
            _sharded().load(path / _sharded().DCP_DIR, optim_tree, model, optimizer, self._group)
            return TrainingState(model=None, optimizer=None, trainer=trainer)
        model_sd = self._read_part(path, listed, "model")
        optim_sd = self._read_part(path, listed, "optimizer")
        if self._group is not None:
            if model is None:
                raise CheckpointError(f"world size {self.world_size}: pass model= (and optimizer=) to load()")
            _sharded().load_full(model, optimizer, model_sd, optim_sd)
            return TrainingState(model=None, optimizer=None, trainer=trainer)
        if model is not None:
            _check_fits(model, model_sd)
        return TrainingState(model=model_sd, optimizer=optim_sd, trainer=trainer)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_fits(model: torch.nn.Module, saved: dict[str, Any]) -> None:
    own = _unwrap(model).state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in saved and isinstance(own[k], torch.Tensor) and isinstance(saved[k], torch.Tensor)
              and own[k].shape != saved[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the model does not fit the checkpoint (another architecture?): missing in the checkpoint "
                         f"{missing[:10]}, not in this model {unexpected[:10]}, shape mismatches {shapes[:10]}")
