"""TensorRT outputs: a calibration cache for implicit INT8, and the explicit-quantization QDQ.

Calibration cache (what ``IInt8Calibrator.writeCalibrationCache`` produces and
``readCalibrationCache`` accepts), one text file:

    TRT-<version>-EntropyCalibration2
    <tensor name>: <scale as the 8 hex digits of its IEEE-754 float32 bit pattern>

with scale = amax / 127 (TensorRT's implicit INT8 is symmetric). The hex digits are the
big-endian bytes of the float, e.g. 1.0 -> ``3f800000``. Tensor names must be the names
TensorRT's ONNX parser gives the network tensors, which are the ONNX tensor names.

Explicit quantization: :func:`write_tensorrt_qdq` writes a QDQ ONNX that TensorRT accepts:
symmetric int8 everywhere (zero point 0), per-channel weights on the output-channel axis,
float bias (TensorRT fuses the bias itself).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.plan import QuantPlan
    from calibration.writers.qdq import QdqResult

#: TensorRT version tag written in the header; readers of the cache compare it to their own.
DEFAULT_TRT_VERSION = "8601"
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")


def float_to_hex(value: float) -> str:
    """The 8 hex digits of ``value``'s float32 bit pattern (big-endian byte order)."""
    return struct.pack(">f", float(value)).hex()


def hex_to_float(text: str) -> float:
    """Inverse of :func:`float_to_hex`."""
    return float(struct.unpack(">f", bytes.fromhex(text.strip()))[0])


def write_calibration_cache(
    path: Path,
    ranges: dict[str, tuple[float, float]],
    algorithm: str = "EntropyCalibration2",
    trt_version: str = DEFAULT_TRT_VERSION,
) -> dict[str, float]:
    """Write a TensorRT calibration cache from activation ranges.

    Args:
        path: output file.
        ranges: tensor name -> (lo, hi); the symmetric amax = max(|lo|, |hi|) is used.
        algorithm: the calibrator name in the header (the ranges came from our observer; the
            header only tells TensorRT which calibrator class may reuse the cache).
        trt_version: version digits in the header, e.g. "8601" for 8.6.1.

    Returns:
        tensor name -> scale as written.
    """
    if algorithm not in ALGORITHMS:
        raise CalibrationError(f"unknown TensorRT calibrator {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    scales: dict[str, float] = {}
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name, (lo, hi) in ranges.items():
        if ":" in name or "\n" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT cache (':' or newline)")
        amax = max(abs(float(lo)), abs(float(hi)))
        scale = float(np.float32(amax / 127.0)) if amax > 0 else float(np.float32(1.0 / 127.0))
        scales[name] = scale
        lines.append(f"{name}: {float_to_hex(scale)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return scales


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    """Parse a TensorRT calibration cache into (header, tensor -> scale)."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationError(f"{str(path)!r} is not a TensorRT calibration cache (no 'TRT-' header)")
    scales = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        name, _, hexval = line.rpartition(":")
        scales[name] = hex_to_float(hexval)
    return lines[0], scales


def write_tensorrt_qdq(model_path: Path, output: Path, plan: QuantPlan, verify: bool = True) -> QdqResult:
    """Write the explicit-quantization QDQ model for TensorRT from a symmetric plan.

    Raises:
        CalibrationError: the plan is not symmetric int8, or the written model breaks a rule.
    """
    from calibration.writers.qdq import write_qdq

    if not plan.symmetric:
        raise CalibrationError("TensorRT explicit quantization needs a symmetric plan (activation_mode='symmetric')")
    res = write_qdq(
        model_path, output, plan.ranges, plan.acts, plan.weights,
        symmetric=True, per_channel=True, verify=verify, quantize_bias=False,
    )
    check_tensorrt_rules(output)
    return res


def check_tensorrt_rules(path: Path) -> None:
    """Raise if a QDQ model breaks TensorRT's explicit-quantization rules.

    Rules checked: every Q/DQ is int8 with zero point 0; per-channel weight DQs use the
    weight's output-channel axis (0 for Conv, 1 for ConvTranspose).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            if zp.dtype == np.int32 and n.op_type == "DequantizeLinear":
                raise CalibrationError(f"{n.name}: int32 bias is not allowed by TensorRT (keep bias float)")
            raise CalibrationError(f"{n.name}: TensorRT needs int8 zero point 0, got {zp.dtype} {zp.ravel()[:3]}")
        scale = inits.get(n.input[1])
        if n.op_type == "DequantizeLinear" and scale is not None and scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            for c in consumers.get(n.output[0], []):
                want = 1 if c.op_type == "ConvTranspose" else 0
                if c.op_type in ("Conv", "ConvTranspose") and c.input[1] == n.output[0] and axis != want:
                    raise CalibrationError(f"{n.name}: per-channel axis {axis}, TensorRT needs {want} for {c.op_type}")


def calibration_cache_from_qdq(qdq_path: Path, out: Path, trt_version: str = DEFAULT_TRT_VERSION) -> dict[str, float]:
    """The calibration cache holding exactly the activation ranges of a TensorRT QDQ model.

    The QDQ model is what TensorRT builds from (explicit quantization); the cache carries the
    same ranges for implicit INT8 on older TensorRT, keyed by the fp32 tensor names (a
    QuantizeLinear's input is the fp32 model's tensor of the same name). Returns tensor -> scale.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ranges: dict[str, tuple[float, float]] = {}
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue  # weights are quantized in the graph itself; the cache holds activations
        scale = inits.get(n.input[1])
        if scale is None or scale.size != 1:
            raise CalibrationError(f"{n.name}: activation scale must be one constant for a TensorRT cache")
        amax = float(scale.reshape(())) * 127.0
        ranges[n.input[0]] = (-amax, amax)
    return write_calibration_cache(out, ranges, trt_version=trt_version)
