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

from fullchain.artifact import ModelSpec
from fullchain.errors import UserError

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


def shape_ranges(spec: ModelSpec) -> dict[str, list[int]]:
    """min / opt / max input shapes for the dynamic batch (and sequence length for token inputs)."""
    inp = spec.input
    if inp["kind"] in ("text", "lm"):
        t = inp["max_length"]
        return {"min": [1, 1], "opt": [OPT_BATCH, t], "max": [MAX_BATCH, t]}
    rest = [inp["channels"], inp["height"], inp["width"]] if inp["kind"] == "image" else [inp["num_features"]]
    return {"min": [1, *rest], "opt": [OPT_BATCH, *rest], "max": [MAX_BATCH, *rest]}


def trtexec_command(exe: str, major: int, onnx: Path, engine: Path, shapes: dict[str, list[int]],
                    fp16: bool, input_name: str = "input") -> tuple[list[str], list[str]]:
    """The trtexec command line for TensorRT `major`, and notes on what it could not honour."""
    def dims(key: str) -> str:
        return f"{input_name}:" + "x".join(str(d) for d in shapes[key])

    cmd = [exe, f"--onnx={onnx}", f"--saveEngine={engine}", f"--memPoolSize=workspace:{WORKSPACE_MIB}M",
           f"--minShapes={dims('min')}", f"--optShapes={dims('opt')}", f"--maxShapes={dims('max')}"]
    notes = []
    if fp16 and major < 11:
        cmd.append("--fp16")
    elif fp16:
        notes.append(f"TensorRT {major} builds strongly typed networks: the engine keeps the ONNX model's fp32; "
                     "convert the ONNX file to fp16 first (ModelOpt AutoCast) for an fp16 engine")
    return cmd, notes


def build_engine(builder: Builder, onnx: Path, engine: Path, spec: ModelSpec, fp16: bool = True) -> list[str]:
    shapes = shape_ranges(spec)
    if builder.kind == "trtexec":
        cmd, notes = trtexec_command(builder.executable, builder.major, onnx, engine, shapes, fp16)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise UserError(f"trtexec failed (exit {done.returncode}): {' | '.join(tail)}")
        return notes
    return _build_with_python_api(onnx, engine, shapes, fp16, builder.major)


def _build_with_python_api(onnx: Path, engine: Path, shapes: dict[str, list[int]], fp16: bool,
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
    profile.set_shape(network.get_input(0).name, shapes["min"], shapes["opt"], shapes["max"])
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
