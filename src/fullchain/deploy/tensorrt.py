"""TensorRT engines from an exported ONNX file, through the TensorRT Python API or `trtexec`.

TensorRT 10 and 11 differ: 10 takes a precision flag (`--fp16`, `BuilderFlag.FP16`) on weakly typed
networks; 11 removed the precision flags because every network is strongly typed (precision comes from the
ONNX model, e.g. after ModelOpt AutoCast). Both take a workspace pool limit and min/opt/max shapes for the
dynamic batch. When neither the Python package nor `trtexec` is installed the export stops with exit 2 and
says what to install.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fullchain.errors import UserError
from fullchain.tasks import Task

INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt (the Python builder API), or install NVIDIA "
                "TensorRT so that trtexec is on PATH; then run ds export again with --format tensorrt")
WORKSPACE_MIB = 1024
OPT_BATCH, MAX_BATCH = 8, 64


@dataclass
class Builder:
    kind: str  # "python" or "trtexec"
    major: int
    executable: str | None = None


def find_builder() -> Builder:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]

        return Builder("python", int(trt.__version__.split(".")[0]))
    except ImportError:
        pass
    exe = shutil.which("trtexec")
    if exe is None:
        raise UserError(INSTALL_HINT)
    return Builder("trtexec", trtexec_major(exe), exe)


def trtexec_major(exe: str) -> int:
    """The major version from trtexec's banner, e.g. '[TensorRT v101300]' -> 10."""
    banner = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    digits = banner.partition("TensorRT v")[2][:6]
    return int(digits) // 10000 if digits.isdigit() else 10


def shape_ranges(task: Task) -> dict[str, dict[str, list[int]]]:
    """Per input, min / opt / max shapes: the batch from 1 to `MAX_BATCH`, a sequence from 1 token to the
    model's maximum length, every other dimension as the model takes it."""
    length = getattr(task, "max_length", None)
    example = task.example_batch(1, length=length)
    ranges = {}
    for name, dims in task.dynamic_dims().items():
        shape = list(example[name].shape)
        low, opt, high = list(shape), list(shape), list(shape)
        for i, label in dims.items():
            low[i], opt[i], high[i] = (1, OPT_BATCH, MAX_BATCH) if label == "batch" else (1, shape[i], shape[i])
        ranges[name] = {"min": low, "opt": opt, "max": high}
    return ranges


def trtexec_command(exe: str, major: int, onnx: Path, engine: Path, shapes: dict[str, dict[str, list[int]]],
                    fp16: bool) -> tuple[list[str], list[str]]:
    """The trtexec command line for TensorRT `major`, and notes on what it could not honour."""
    def dims(key: str) -> str:
        return ",".join(f"{name}:" + "x".join(str(d) for d in r[key]) for name, r in shapes.items())

    cmd = [exe, f"--onnx={onnx}", f"--saveEngine={engine}", f"--memPoolSize=workspace:{WORKSPACE_MIB}M",
           f"--minShapes={dims('min')}", f"--optShapes={dims('opt')}", f"--maxShapes={dims('max')}"]
    notes = []
    if fp16 and major < 11:
        cmd.append("--fp16")
    elif fp16:
        notes.append(f"TensorRT {major} builds strongly typed networks: the engine keeps the ONNX model's fp32; "
                     "convert the ONNX file to fp16 first (ModelOpt AutoCast) for an fp16 engine")
    return cmd, notes


def build_engine(builder: Builder, onnx: Path, engine: Path, task: Task, fp16: bool = True) -> list[str]:
    shapes = shape_ranges(task)
    if builder.kind == "trtexec":
        cmd, notes = trtexec_command(builder.executable, builder.major, onnx, engine, shapes, fp16)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise UserError(f"trtexec failed (exit {done.returncode}): {' | '.join(tail)}")
        return notes
    return _build_with_python_api(onnx, engine, shapes, fp16, builder.major)


def _build_with_python_api(onnx: Path, engine: Path, shapes: dict[str, dict[str, list[int]]], fp16: bool,
                           major: int) -> list[str]:
    import tensorrt as trt  # type: ignore[import-not-found]

    logger = trt.Logger(trt.Logger.WARNING)
    trt_builder = trt.Builder(logger)
    flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = trt_builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx}: TensorRT cannot parse it ({errors})")
    config = trt_builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_MIB << 20)
    profile = trt_builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, r["min"], r["opt"], r["max"])
    config.add_optimization_profile(profile)
    notes = []
    if fp16 and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    elif fp16:
        notes.append(f"TensorRT {major} builds strongly typed networks: the engine keeps the ONNX model's fp32")
    serialized = trt_builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx}: TensorRT could not build an engine (see the messages above)")
    engine.write_bytes(bytes(serialized))
    return notes
