"""Model accounting on the ONNX graph: parameters, FLOPs (MACs x 2), activation memory.

Shapes come from ONNX shape inference on the static-shape graph. Activation memory is reported
two ways: the sum of every intermediate tensor (what a naive runtime allocates) and the peak of
live tensors when the nodes run in graph order and each tensor is freed after its last consumer
(a lower bound for a runtime that reuses buffers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_BYTES = {1: 4, 10: 2, 11: 8, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1}  # onnx TensorProto elem type -> bytes


def _shape(vi: Any) -> list[int] | None:
    dims = vi.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def analyze_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes: dict[str, list[int]] = {}
    elem: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        s = _shape(vi)
        if s is not None:
            shapes[vi.name] = s
            elem[vi.name] = vi.type.tensor_type.elem_type
    params = int(sum(a.size for a in inits.values()))
    param_bytes = int(sum(a.nbytes for a in inits.values()))

    macs_by_op: dict[str, int] = {}
    for node in graph.node:
        macs = _node_macs(node, shapes, inits)
        if macs:
            macs_by_op[node.op_type] = macs_by_op.get(node.op_type, 0) + macs

    # Activation memory: intermediate tensors (not initializers, not graph inputs).
    def nbytes(name: str) -> int:
        s = shapes.get(name)
        return int(np.prod(s)) * _BYTES.get(elem.get(name, 1), 4) if s is not None else 0

    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in graph.output}
    live: dict[str, int] = {i.name: nbytes(i.name) for i in graph.input if i.name not in inits}
    peak = sum(live.values())
    total = 0
    for i, node in enumerate(graph.node):
        for name in node.output:
            size = nbytes(name)
            live[name] = size
            total += size
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                del live[name]
    macs_total = int(sum(macs_by_op.values()))
    return {
        "params": params,
        "param_bytes": param_bytes,
        "macs": macs_total,
        "flops": 2 * macs_total,
        "macs_by_op": macs_by_op,
        "activation_bytes_total": total,
        "activation_bytes_peak": peak,
        "nodes": len(graph.node),
    }


def _node_macs(node: Any, shapes: dict[str, list[int]], inits: dict[str, np.ndarray]) -> int:
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "Conv" and out is not None:
        w = inits.get(node.input[1])
        wshape = list(w.shape) if w is not None else shapes.get(node.input[1])
        if wshape is None:
            return 0
        # out: N, Cout, *spatial ; w: Cout, Cin/group, *kernel
        return int(np.prod(out)) * int(np.prod(wshape[1:]))
    if node.op_type in ("Gemm", "MatMul") and out is not None:
        a = shapes.get(node.input[0])
        if a is None:
            return 0
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        k = a[-2] if trans_a and len(a) >= 2 else a[-1]
        return int(np.prod(out)) * int(k)
    return 0


def format_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
