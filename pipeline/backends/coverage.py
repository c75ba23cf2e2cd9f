"""INT8 op coverage of a converted artifact: how many of its compute ops actually run in int8.

A quantized model can still spend its time in float: an op its runtime has no int8 kernel for, a
layer the fallback kept float, a Quantize/Dequantize pair the runtime did not fuse (each one a
float <-> int8 round trip of a whole tensor). This module reads each runtime's own view of the
artifact, on the host, at build time (no timing):

* ONNX Runtime: the graph the CPU session actually runs, saved by the session itself
  (``optimized_model_filepath``, ORT_ENABLE_ALL as the device runner loads it; the agent's
  ``build_artifact``). Integer kernels (QLinearConv, QGemm, MatMulInteger, ...) and ops that
  read int8 tensors (MaxPool on uint8) count as int8; every other compute op as float.
* TFLite: the flatbuffer's operators; an op whose first input is an integer tensor is int8.
* ncnn: the .param's weighted layers; Convolution / ConvolutionDepthWise / InnerProduct with
  ``int8_scale_term`` (key 8) set are int8. ncnn's int8 layers quantize their input and
  dequantize their output inside the layer, so every weightless layer runs in float.
* TensorRT: the engine picks each layer's precision on the device; the host cannot say
  (the device build's ``precisions`` says it after a deploy).

The result, ``Coverage.to_dict()``, is the conversion report's ``int8_coverage``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: data movement: runs on whatever type it is given, computes nothing (not counted as compute)
MOVEMENT_OPS = frozenset({
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "Pad",
    "Identity", "Shape", "Size", "Constant", "ConstantOfShape", "Expand", "Tile", "DepthToSpace",
    "SpaceToDepth", "ReorderInput", "ReorderOutput", "Cast",
    # TFLite builtins
    "RESHAPE", "TRANSPOSE", "CONCATENATION", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "GATHER", "SLICE",
    "STRIDED_SLICE", "SPLIT", "SPLIT_V", "PACK", "UNPACK", "SHAPE", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH", "CAST",
    "BROADCAST_TO", "TILE",
})
#: the data moves that copy a whole tensor into a new layout: worth naming on integer tensors too,
#: where they are easy to miss (litert-torch's int8 EfficientNet-Lite0 kept 8 TRANSPOSEs around PADs)
LAYOUT_COPIES = frozenset({"Transpose", "Pad", "DepthToSpace", "SpaceToDepth",
                           "TRANSPOSE", "PAD", "PADV2", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH"})
#: ONNX Runtime's integer kernels, by op type (any domain), and whether their output is integer
ORT_INTEGER_OPS = {"MatMulInteger": True, "ConvInteger": True, "QGemm": True, "QAttention": False,
                   "MatMulIntegerToFloat": False, "DynamicQuantizeMatMul": False, "DynamicQuantizeLSTM": False}
ORT_QUANTIZE, ORT_DEQUANTIZE = ("QuantizeLinear", "DynamicQuantizeLinear"), ("DequantizeLinear",)
#: ncnn layer types that do the arithmetic (int8 possible for QUANTIZABLE ones only)
NCNN_COMPUTE_PREFIXES = ("Convolution", "Deconvolution", "InnerProduct", "Gemm", "MatMul", "MultiHeadAttention")
INTEGER_TYPES = frozenset({"int8", "uint8", "int16", "int32"})


@dataclass
class Coverage:
    """Compute ops by where they run. ``qdq_left``: activation Quantize/Dequantize ops inside the
    model that the runtime runs as ops of their own (each a float <-> int8 round trip of a
    tensor); ``qdq_io``: those on the model's float inputs and outputs (unavoidable with float
    I/O); ``float_data_ops``: data-movement ops (Transpose, Pad, Concat, ...) left on float tensors;
    ``int8_layout_ops``: the layout copies (Transpose, Pad, ...) on integer tensors."""

    source: str
    int8: int = 0
    float_ops: Counter = field(default_factory=Counter)
    float_layers: list[str] = field(default_factory=list)
    qdq_left: int = 0
    qdq_io: int = 0
    float_data_ops: Counter = field(default_factory=Counter)
    int8_layout_ops: Counter = field(default_factory=Counter)
    note: str = ""

    def add(self, op: str, name: str, integer: bool) -> None:
        """One compute op, int8 or float (a float one is listed by type and by name)."""
        if integer:
            self.int8 += 1
        else:
            self.float_ops[op] += 1
            self.float_layers.append(name)

    def data_op(self, op: str, integer: bool, constant: bool) -> None:
        """One data-movement op: listed when it moves a float activation, or copies an integer one."""
        if constant:
            return
        if not integer:
            self.float_data_ops[op] += 1
        elif op in LAYOUT_COPIES:
            self.int8_layout_ops[op] += 1

    def qdq(self, edge: bool) -> None:
        """One Quantize/Dequantize op run on its own: at the model's float I/O (``edge``) or inside."""
        if edge:
            self.qdq_io += 1
        else:
            self.qdq_left += 1

    def to_dict(self) -> dict[str, Any]:
        floats = sum(self.float_ops.values())
        out = {"compute_ops": self.int8 + floats, "int8": self.int8, "float": floats, "qdq_left": self.qdq_left,
               "qdq_io": self.qdq_io, "float_ops": dict(self.float_ops.most_common()),
               "float_layers": self.float_layers,
               "float_data_ops": dict(self.float_data_ops.most_common()),
               "int8_layout_ops": dict(self.int8_layout_ops.most_common()), "source": self.source}
        return out | ({"note": self.note} if self.note else {})


def artifact_coverage(runner: str, workdir: Path, config: dict[str, Any], threads: int = 2) -> dict[str, Any]:
    """The int8 coverage of a written artifact (its runner's name, folder and runner config)."""
    if runner == "onnxruntime":
        return onnxruntime_coverage(Path(workdir) / config["model"], threads).to_dict()
    if runner == "tflite":
        return tflite_coverage(Path(workdir) / config["model"]).to_dict()
    if runner == "ncnn":
        return ncnn_coverage(Path(workdir) / config["param"]).to_dict()
    return {"unknown": f"{runner}: the engine chooses each layer's precision on the device; after a deploy the "
                       "run's device_build.precisions says how many layers run in int8"}


def onnxruntime_coverage(model: Path, threads: int = 2) -> Coverage:
    """What the CPU session runs: the graph it optimised, saved by the session itself."""
    import onnx

    from pipeline.agent.runners.onnxruntime import build_artifact

    with tempfile.TemporaryDirectory(prefix="edgeship-coverage-") as tmp:
        config = {"model": model.name, "device_build": {"artifact": "optimized.onnx"}}
        build_artifact(model.parent, config, Path(tmp), threads)
        graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    cov = Coverage("onnxruntime CPU session, ORT_ENABLE_ALL, on the build host")
    dtypes = _onnx_input_types(graph)
    constants = {i.name for i in graph.initializer}
    edges = {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        first = node.input[0] if node.input else ""
        edge = first in edges or any(o in edges for o in node.output)
        out_integer = _classify_onnx_node(cov, node, dtypes.get(first) in INTEGER_TYPES, first in constants, edge)
        for name in node.output:
            dtypes[name] = "int8" if out_integer else "float"
    return cov


def _classify_onnx_node(cov: Coverage, node: Any, integer_in: bool, constant_in: bool, edge: bool) -> bool:
    """Count one node of the optimised graph; returns whether its output is an integer tensor."""
    op = node.op_type
    if op in ORT_QUANTIZE + ORT_DEQUANTIZE:
        if not constant_in:  # a weight's DequantizeLinear feeds a float op, counted there
            cov.qdq(edge)
        return op in ORT_QUANTIZE
    if op in MOVEMENT_OPS:
        cov.data_op(op, integer_in, constant_in)
        return integer_in
    if op.startswith("QLinear") or op in ORT_INTEGER_OPS:
        cov.add(op, node.name, True)
        return ORT_INTEGER_OPS.get(op, True) and not (op == "QGemm" and len(node.input) < 9)
    cov.add(op, node.name, integer_in)  # e.g. MaxPool on uint8 runs an int8 kernel
    return integer_in


def _onnx_input_types(graph: Any) -> dict[str, str]:
    """Element type of every tensor known before the first node: initializers and graph inputs."""
    import onnx

    def name(elem: int) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "float"

    out = {i.name: name(i.data_type) for i in graph.initializer}
    out.update({i.name: name(i.type.tensor_type.elem_type) for i in graph.input})
    return out


def tflite_coverage(model: Path) -> Coverage:
    """Per operator of the main subgraph, by its first input's type (the flatbuffer itself)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(Path(model).read_bytes(), 0)
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sub = m.Subgraphs(0)
    edges = {sub.Inputs(k) for k in range(sub.InputsLength())} | {sub.Outputs(k) for k in range(sub.OutputsLength())}
    cov = Coverage("tflite flatbuffer, main subgraph")
    for i in range(sub.OperatorsLength()):
        op = sub.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        name = ops.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        if name == "CUSTOM":
            name = (code.CustomCode() or b"CUSTOM").decode()
        first = sub.Tensors(op.Inputs(0)) if op.InputsLength() and op.Inputs(0) >= 0 else None
        dtype = types.get(first.Type(), "float32") if first is not None else "float32"
        constant = first is not None and _tflite_constant(m, first)
        out_name = sub.Tensors(op.Outputs(0)).Name().decode() if op.OutputsLength() else name
        edge = (op.InputsLength() and op.Inputs(0) in edges) or (op.OutputsLength() and op.Outputs(0) in edges)
        _classify_tflite_op(cov, name, out_name, dtype in INTEGER_TYPES, constant, bool(edge))
    return cov


def _tflite_constant(model: Any, tensor: Any) -> bool:
    """A tensor whose buffer holds data (a weight), not an activation."""
    buf = tensor.Buffer()
    return buf > 0 and (model.Buffers(buf).DataLength() > 0 or model.Buffers(buf).Size() > 0)


def _classify_tflite_op(cov: Coverage, op: str, name: str, integer_in: bool, constant_in: bool, edge: bool) -> None:
    if op == "QUANTIZE":
        if not integer_in:  # int8 -> int8 is a requantize, not a round trip
            cov.qdq(edge)
    elif op == "DEQUANTIZE":
        if not constant_in:  # fp16 weights dequantized once are not a round trip
            cov.qdq(edge)
    elif op in MOVEMENT_OPS:
        cov.data_op(op, integer_in, constant_in)
    else:
        cov.add(op, name, integer_in)


def ncnn_coverage(param: Path) -> Coverage:
    """The weighted layers of an ncnn .param: int8 where ``int8_scale_term`` (key 8) is set."""
    from pipeline.backends.ncnn.int8 import QUANTIZABLE
    from pipeline.backends.ncnn.paramfile import read

    cov = Coverage("ncnn .param, int8_scale_term per weighted layer",
                   note="each int8 layer quantizes its float input and dequantizes its output itself (or "
                        "requantizes it for the int8 conv that alone reads it, int8_scale_term 101); "
                        "weightless layers run in float")
    for layer in read(param).layers:
        if layer.type in ("Quantize", "Dequantize", "Requantize"):
            cov.qdq(False)
        elif layer.type.startswith(NCNN_COMPUTE_PREFIXES):
            cov.add(layer.type, layer.name, layer.type in QUANTIZABLE and layer.get_int(8) != 0)
    return cov


def coverage_line(cov: dict[str, Any] | None, device_build: dict[str, Any] | None = None) -> str | None:
    """One line for a report, e.g. ``int8 ops: 59/60, float: ReduceMean x1; Q/DQ left inside: 2 (+2 at
    the inputs/outputs)``; a TensorRT run says what its engine chose on the device, when it was built."""
    if not cov:
        return None
    precisions = (device_build or {}).get("precisions") or {}
    if "unknown" in cov:
        if not precisions:
            return f"int8 ops: unknown on the host ({cov['unknown']})"
        others = ", ".join(f"{p} x{n}" for p, n in precisions.items() if p != "int8")
        return (f"int8 layers: {precisions.get('int8', 0)}/{sum(precisions.values())} (the engine built on the "
                f"device){', other: ' + others if others else ''}")
    floats = ", ".join(f"{op} x{n}" for op, n in (cov.get("float_ops") or {}).items())
    moved = ", ".join(f"{op} x{n}" for op, n in (cov.get("float_data_ops") or {}).items())
    line = f"int8 ops: {cov['int8']}/{cov['compute_ops']}" + (f", float: {floats}" if floats else ", none float")
    line += f"; Q/DQ left inside: {cov.get('qdq_left', 0)} (+{cov.get('qdq_io', 0)} at the inputs/outputs)"
    copies = ", ".join(f"{op} x{n}" for op, n in (cov.get("int8_layout_ops") or {}).items())
    return line + (f"; float data moves: {moved}" if moved else "") + (f"; int8 layout copies: {copies}" if copies else "")


def coverage_cell(cov: dict[str, Any] | None) -> str:
    """The table cell: ``59/60`` (int8 compute ops / all), ``?`` where the host cannot say, ``-`` for no int8."""
    if not cov:
        return "-"
    return "?" if "unknown" in cov else f"{cov['int8']}/{cov['compute_ops']}"
