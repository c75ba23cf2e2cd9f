"""TensorRT engines built on the device: with the board's TensorRT Python API, or with ``trtexec``
where only that exists (JetPack ships it under /usr/src/tensorrt/bin).

Builder settings come from the run config (the target's ``builds[].options``): ``precision``
(fp16 -> FP16 flag; int8 -> INT8 flag on the QDQ model, i.e. explicit quantization),
``workspace_mb`` (workspace memory pool), ``dla_core`` (DLA with GPU fallback) and ``profile``
(``{min, opt, max}`` of the batch dimension). The engine is built with detailed profiling
verbosity so that the engine inspector can report each layer's precision.

Standard library and ``tensorrt`` only (ctypes for the CUDA driver's device query).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .device_build import BuildFailed, Unavailable, host_name, python_desc

TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec",)
# CUdevice_attribute: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR (cuda.h, stable ABI)
_CC_MAJOR, _CC_MINOR = 75, 76


def not_installed() -> str:
    """The one line a device without TensorRT gets for each of its TensorRT runs."""
    return (f"tensorrt is not installed on {host_name()} ({python_desc()}); JetPack 6 ships it "
            "(python3-libnvinfer: make the runtime venv with --system-site-packages)")


def find_trtexec() -> str | None:
    found = shutil.which("trtexec")
    return found or next((p for p in TRTEXEC_PATHS if os.access(p, os.X_OK)), None)


def _norm_version(text: str) -> str:
    """'10.3.0.30' -> '10.3.0'; trtexec's 'v100300' -> '10.3.0', 'v8601' -> '8.6.1'."""
    if "." in text:
        return ".".join(text.split(".")[:3])
    major, minor = (text[0], text[1]) if len(text) == 4 else (text[:-4], text[-4:-2])
    return f"{int(major)}.{int(minor)}.{int(text[-2:])}"


def tensorrt_version() -> tuple[str, str]:
    """(TensorRT version, builder): the Python API when it imports, else trtexec; Unavailable if neither."""
    try:
        import tensorrt
    except ImportError:
        exe = find_trtexec()
        if exe is None:
            raise Unavailable(not_installed()) from None
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
        m = re.search(r"TensorRT v(\d{4,})", out.stdout + out.stderr)
        if m is None:
            raise Unavailable(f"{exe} on {host_name()} printed no TensorRT version; is it JetPack's trtexec?") from None
        return _norm_version(m.group(1)), exe
    return _norm_version(str(tensorrt.__version__)), "python"


def gpu_identity() -> dict[str, str]:
    """GPU name and compute capability from the CUDA driver (libcuda), which every NVIDIA driver
    and JetPack install; an engine built for one GPU does not run on another."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise Unavailable(f"no CUDA driver on {host_name()} (libcuda.so.1 not found); JetPack 6 ships it") from None
    rc = cuda.cuInit(0)
    if rc != 0:
        raise Unavailable(f"the CUDA driver on {host_name()} found no usable GPU (cuInit error {rc}); "
                          "is the user in the video/render group?")
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (cuda.cuDeviceGet(ctypes.byref(dev), 0) or cuda.cuDeviceGetName(name, 256, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)):
        raise Unavailable(f"the CUDA driver on {host_name()} could not describe GPU 0")
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def identity() -> dict[str, str]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability."""
    version, _ = tensorrt_version()
    return {"tensorrt": version, **gpu_identity()}


def _shapes(dims: list[int], profile: dict[str, int]) -> tuple[tuple[int, ...], ...]:
    rest = tuple(int(d) for d in dims[1:])
    return tuple((int(profile[k]), *rest) for k in ("min", "opt", "max"))


def build(onnx: Path, engine: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Build ``engine`` from ``onnx`` with the run's precision and options; results block fields."""
    _, builder = tensorrt_version()
    if builder == "python":
        return _build_python(onnx, engine, config)
    return _build_trtexec(builder, onnx, engine, config)


def _apply_options(trt: Any, builder: Any, network: Any, cfg: Any, config: dict[str, Any]) -> None:
    """Precision flags, workspace, DLA core and batch profile onto a builder config."""
    precision = config.get("precision")
    opts = config["device_build"].get("options") or {}
    if precision == "fp16":
        cfg.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        cfg.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the ranges are the QDQ model's
    if opts.get("workspace_mb"):
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts["workspace_mb"]) << 20)
    if opts.get("dla_core") is not None:
        cfg.default_device_type = trt.DeviceType.DLA
        cfg.DLA_core = int(opts["dla_core"])
        cfg.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA cannot run go to the GPU
    if opts.get("profile"):  # the batch range of every input (they share axis 0)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            profile.set_shape(inp.name, *_shapes(list(inp.shape), opts["profile"]))
        cfg.add_optimization_profile(profile)


def _logger(trt: Any, lines: list[str]) -> Any:
    """A TensorRT logger keeping INFO and above: the build log that goes back in the results."""
    class _Log(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity)).split(".")[-1]
            if name != "VERBOSE":
                lines.append(f"[{name}] {msg}")

    return _Log()


def _build_python(onnx: Path, engine: Path, config: dict[str, Any]) -> dict[str, Any]:
    import tensorrt as trt

    lines: list[str] = []
    log = _logger(trt, lines)
    builder = trt.Builder(log)
    explicit = 0 if int(_norm_version(trt.__version__).split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # implicit batch is gone in 10
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"TensorRT's ONNX parser on {host_name()} refused {onnx.name}: {errors}")
    cfg = builder.create_builder_config()
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector's per-layer precision
    _apply_options(trt, builder, network, cfg, config)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        last = next((ln for ln in reversed(lines) if ln.startswith("[ERROR]")), "see the build log")
        raise BuildFailed(f"TensorRT {trt.__version__} on {host_name()} could not build the "
                          f"{config.get('precision')} engine: {last}")
    engine.write_bytes(bytes(serialized))
    runtime = trt.Runtime(log)
    inspector = runtime.deserialize_cuda_engine(serialized).create_engine_inspector()
    layers = layer_precisions(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))
    return {"builder": f"tensorrt {trt.__version__} (python)", "log": "\n".join(lines), **layers}


def _trtexec_args(exe: str, onnx: Path, engine: Path, config: dict[str, Any]) -> list[str]:
    opts = config["device_build"].get("options") or {}
    args = [exe, f"--onnx={onnx}", f"--saveEngine={engine}", "--skipInference",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={engine.parent / 'layers.json'}"]
    args += {"fp16": ["--fp16"], "int8": ["--int8"]}.get(str(config.get("precision")), [])
    if opts.get("workspace_mb"):
        args.append(f"--memPoolSize=workspace:{int(opts['workspace_mb'])}M")
    if opts.get("dla_core") is not None:
        args += [f"--useDLACore={int(opts['dla_core'])}", "--allowGPUFallback"]
    if opts.get("profile"):
        shapes = config.get("input_shapes") or {config["input"]: config["input_shape"]}  # older configs: one
        order = config.get("inputs") or list(shapes)  # the model's order (the config's JSON sorts its keys)
        per_input = {name: _shapes([int(d) for d in shapes[name]], opts["profile"]) for name in order}
        for k, flag in enumerate(("min", "opt", "max")):
            spec = ",".join(f"{name}:{'x'.join(str(d) for d in s[k])}" for name, s in per_input.items())
            args.append(f"--{flag}Shapes={spec}")
    return args


def _build_trtexec(exe: str, onnx: Path, engine: Path, config: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(_trtexec_args(exe, onnx, engine, config), capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = next((ln for ln in reversed(log.splitlines()) if "ERROR" in ln or "FAILED" in ln), "no output")
        raise BuildFailed(f"trtexec on {host_name()} failed (exit {proc.returncode}): {last.strip()}")
    info = engine.parent / "layers.json"
    layers = layer_precisions(json.loads(info.read_text())) if info.is_file() else {"layers": []}
    return {"builder": f"trtexec {exe}", "log": log, **layers}


def _layer_precision(layer: dict[str, Any]) -> str:
    """A layer's precision from the inspector's JSON: 'Precision' where given, else the first
    output's 'Format/Datatype' (e.g. 'Row major linear FP32', 'Channel major FP16 format')."""
    text = str(layer.get("Precision") or next(iter(layer.get("Outputs") or []), {}).get("Format/Datatype", ""))
    for token, name in (("int8", "int8"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32")):
        if token in text.lower():
            return name
    return text or "unknown"


def layer_precisions(info: dict[str, Any]) -> dict[str, Any]:
    """``{"layers": [{"name", "type", "precision"}], "precisions": {precision: count}}`` from the
    engine inspector's (or trtexec --exportLayerInfo's) JSON, detailed verbosity."""
    layers = [{"name": str(d.get("Name")), "type": str(d.get("LayerType", "")), "precision": _layer_precision(d)}
              for d in info.get("Layers", []) if isinstance(d, dict)]
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    return {"layers": layers, "precisions": counts}
