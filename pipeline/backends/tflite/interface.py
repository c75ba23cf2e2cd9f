"""Inspect and rewrite the inputs/outputs of a .tflite flatbuffer.

litert-torch's full-integer (PT2E static) conversion folds the boundary quantize/dequantize
into the graph, so the model takes and returns int8 tensors. That is what ``int8_io: true``
wants. For the default (float I/O, drop-in for the fp32 model) :func:`add_float_io` puts a
QUANTIZE op in front of each integer input and a DEQUANTIZE op after each integer output, with
the scales and zero points the converter chose. TFLite's own converter does the same for
``inference_input_type=float32``; we do it on the flatbuffer because litert-torch exposes no
such flag.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_INT_TYPES = {"int8": 9, "uint8": 3, "int16": 7}  # schema TensorType values


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _type_name(schema: Any, code: int) -> str:
    for name, value in vars(schema.TensorType).items():
        if value == code and not name.startswith("_"):
            return name.lower()
    return str(code)


def _qparams(tensor: Any) -> dict[str, Any] | None:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        return None
    return {"scale": float(np.asarray(q.scale)[0]), "zero_point": int(np.asarray(q.zeroPoint)[0])}


def io_details(model_bytes: bytes) -> dict[str, list[dict[str, Any]]]:
    """Name, dtype, shape and per-tensor quantization of the main subgraph's inputs and outputs."""
    from ai_edge_litert.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]

    def describe(idx: int) -> dict[str, Any]:
        t = sg.tensors[idx]
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        return {"name": name, "dtype": _type_name(schema, t.type),
                "shape": [int(d) for d in np.asarray(t.shape)], "quant": _qparams(t)}

    return {"inputs": [describe(int(i)) for i in sg.inputs], "outputs": [describe(int(i)) for i in sg.outputs]}


def tensor_types(model_bytes: bytes) -> dict[str, int]:
    """How many tensors of each type (float32, float16, int8, ...) the main subgraph holds."""
    from ai_edge_litert.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    counts: dict[str, int] = {}
    for t in model.subgraphs[0].tensors:
        name = _type_name(schema, t.type)
        counts[name] = counts.get(name, 0) + 1
    return counts


def _opcode_index(model: Any, builtin: int) -> int:
    """Index of ``builtin`` in the model's operator codes, appending it if absent."""
    schema = _schema()
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    # deprecated_builtin_code is an int8 field: builtins above 127 store the placeholder 127
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def append_tensor(model: Any, sg: Any, shape: Any, dtype: int, name: str, data: np.ndarray | None = None,
                  shape_signature: Any = None) -> int:
    """Append a tensor of schema type ``dtype`` with its own buffer (holding ``data``, if given:
    a constant); return its index."""
    schema = _schema()
    buf = schema.BufferT()
    if data is not None:
        buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape = np.array(shape, dtype=np.int32)
    t.shapeSignature = None if shape_signature is None else np.array(shape_signature, dtype=np.int32)
    t.type, t.name, t.buffer = dtype, name, len(model.buffers) - 1
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _float_twin(model: Any, sg: Any, idx: int, suffix: str) -> int:
    """Append a float32 tensor shaped like tensor ``idx`` (own empty buffer); return its index."""
    src = sg.tensors[idx]
    name = src.name.decode() if isinstance(src.name, bytes) else str(src.name)
    return append_tensor(model, sg, src.shape, _schema().TensorType.FLOAT32, f"{name}{suffix}",
                         shape_signature=src.shapeSignature)


def add_float_io(model_bytes: bytes) -> bytes:
    """Return the model with float32 inputs/outputs around its integer ones (see module doc).

    Inputs/outputs that are already float are left alone. Signature defs are updated so the
    signature runner sees the same float tensors as the interpreter.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    schema = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]
    int_codes = set(_INT_TYPES.values())
    remap: dict[int, int] = {}

    def wrap(indices: Any, opcode: int, quantize: bool) -> tuple[list[Any], list[int]]:
        """A float twin per integer tensor, joined by QUANTIZE (input side) or DEQUANTIZE (output side)."""
        ops, kept = [], []
        for idx in (int(i) for i in indices):
            if sg.tensors[idx].type not in int_codes:
                kept.append(idx)
                continue
            f = _float_twin(model, sg, idx, "_float")
            op = schema.OperatorT()
            op.opcodeIndex = _opcode_index(model, opcode)
            src, dst = (f, idx) if quantize else (idx, f)
            op.inputs, op.outputs = np.array([src], np.int32), np.array([dst], np.int32)
            ops.append(op)
            kept.append(f)
            remap[idx] = f
        return ops, kept

    front, new_inputs = wrap(sg.inputs, schema.BuiltinOperator.QUANTIZE, quantize=True)
    back, new_outputs = wrap(sg.outputs, schema.BuiltinOperator.DEQUANTIZE, quantize=False)
    if not remap:
        return bytes(model_bytes)
    sg.operators = front + list(sg.operators) + back  # execution order: quantize first, dequantize last
    sg.inputs, sg.outputs = np.array(new_inputs, np.int32), np.array(new_outputs, np.int32)
    for sig in model.signatureDefs or []:
        for tmap in list(sig.inputs or []) + list(sig.outputs or []):
            tmap.tensorIndex = remap.get(int(tmap.tensorIndex), int(tmap.tensorIndex))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
