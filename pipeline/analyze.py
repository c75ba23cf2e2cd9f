"""Model accounting on the ONNX graph the backends consume: per layer and in total.

One row per node of the (optimized) graph, in graph order: its output shapes, the parameters it
uses, its MACs, its other arithmetic and the bytes of its outputs. Conventions:

* ``params``: elements of the initializers a node consumes, each counted at its first consumer,
  so the rows add up to the model's total (shape tensors of Reshape & co. are initializers too).
* ``macs``: multiply-accumulates of the nodes that multiply by weights or by another tensor
  (:data:`MAC_OPS`: Conv, grouped and depthwise included, ConvTranspose, Gemm, MatMul, ...),
  with a bias add counted as one per output element. ``flops`` = 2 x ``macs``.
* ``ops``: every other node's arithmetic, as onnx-tool weighs it per element: 1 for an add, a
  multiply, a compare or a max (Add, Mul, Relu, Clip, MaxPool's kernel positions, a reduction's
  inputs), more for what it costs as several (exp 32, sqrt 24, division 4: Sigmoid, Softmax,
  HardSwish, BatchNormalization are several ops per element). Data movement (Concat, Reshape,
  Transpose, Slice, nearest Resize) is 0.
* ``activation_bytes``: the bytes of a node's outputs. Activation memory in total is reported two
  ways: the sum of every intermediate tensor (what a naive runtime allocates) and the peak of live
  tensors when the nodes run in graph order and each tensor is freed after its last consumer (a
  lower bound for a runtime that reuses buffers).

The MACs and ops are onnx-tool's (a maintained counter that knows ~130 op types), with one
correction: onnx-tool 1.0.1 counts ConvTranspose as output elements x Cout/group x kernel, which
ignores the stride and takes the wrong channel count; ours is exact (input elements x Cout/group
x kernel). An op type the counter does not know is reported (``counted: false``, ``uncounted_ops``)
rather than guessed. Shapes come from ONNX shape inference on the graph with its inputs fixed to
the spec's shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Nodes whose arithmetic is multiply-accumulate: their count is "macs", every other node's "ops".
MAC_OPS = frozenset({"Conv", "ConvInteger", "ConvTranspose", "DeformConv", "Einsum", "Gemm", "GRU", "LSTM",
                     "MatMul", "MatMulInteger", "QLinearConv", "QLinearMatMul", "RNN"})
COUNTER = "onnx-tool"


@dataclass
class Layer:
    """One node of the graph: what it produces and what it costs."""

    index: int
    name: str
    op: str
    outputs: list[dict[str, Any]]  # {"name", "shape" (None when not inferred), "dtype"}
    params: int
    macs: int
    ops: int
    activation_bytes: int
    counted: bool  # False: the counter does not know this op type (macs and ops are 0, not measured)


@dataclass
class _Graph:
    """The shape-inferred graph and what the rows are computed from."""

    model: Any  # onnx.ModelProto, shapes inferred
    inits: dict[str, np.ndarray]
    shapes: dict[str, list[int]]
    dtypes: dict[str, int]


def _shape(vi: Any) -> list[int] | None:
    dims = vi.type.tensor_type.shape.dim
    if not vi.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def _fix_inputs(model: Any, inputs: dict[str, list[int]] | None) -> None:
    """Symbolic dims of the graph's inputs (a dynamic batch) set to the spec's shape, in place."""
    for vi in model.graph.input:
        shape = (inputs or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            continue
        for dim, value in zip(dims, shape):
            if not dim.HasField("dim_value"):
                dim.dim_value = int(value)


def _load(path: Path, inputs: dict[str, list[int]] | None) -> _Graph:
    """The model, inputs fixed, shapes inferred."""
    import onnx
    from onnx import numpy_helper

    raw = onnx.load(str(path))
    _fix_inputs(raw, inputs)
    model = onnx.shape_inference.infer_shapes(raw, strict_mode=False)
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dtypes[vi.name] = vi.type.tensor_type.elem_type
        s = _shape(vi)
        if s is not None:
            shapes[vi.name] = s
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, arr in inits.items():
        shapes[name] = list(arr.shape)
    return _Graph(model, inits, shapes, dtypes)


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):  # UNDEFINED or a type numpy lacks: assume float32
        return 4


def _nbytes(g: _Graph, name: str) -> int:
    s = g.shapes.get(name)
    return int(np.prod(s, dtype=np.int64)) * _itemsize(g.dtypes.get(name, 1)) if s is not None and name else 0


def _conv_transpose_macs(node: Any, g: _Graph) -> int | None:
    """Exact: every input element meets Cout/group x kernel weights (w: Cin, Cout/group, *kernel);
    a bias adds one per output element."""
    x, w = g.shapes.get(node.input[0]), g.shapes.get(node.input[1])
    out = g.shapes.get(node.output[0])
    if x is None or w is None or out is None:
        return None
    bias = len(node.input) > 2 and node.input[2] != ""
    return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) + (
        int(np.prod(out, dtype=np.int64)) if bias else 0)


# Op types whose count is ours, not the counter's (see the module docstring for why).
_OWN: dict[str, Callable[[Any, _Graph], int | None]] = {"ConvTranspose": _conv_transpose_macs}


@dataclass
class _Counted:
    """What the counter found: per node in graph order its count (None: an op type it has no
    profiler for), the tensor shapes it inferred, and why it could not count (None when it could)."""

    counts: list[int | None]
    shapes: dict[str, list[int]]
    error: str | None = None


def _count(g: _Graph) -> _Counted:
    """onnx-tool's counts for the graph's nodes (every node None, and why, when it fails)."""
    nodes = g.model.graph.node
    own_shapes = True
    try:
        import onnx_tool
        from onnx_tool.node import Node as Unprofiled  # what onnx-tool builds for an op type it does not know

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "not registered" warning: we report counted: false instead
            # node_rename: nodes named <op>_<index>, so duplicate or empty names cannot collide; the
            # shape-inferred model seeds its tensors with ONNX's shapes
            tool = onnx_tool.Model(g.model, {"node_rename": True, "remove_dangling": False})
            try:
                tool.graph.shape_infer()
            except Exception:  # noqa: BLE001 - one op type it cannot infer (GlobalMaxPool, Mish in 1.0.1)
                own_shapes = False  # stops its inference: count on ONNX's shapes, which seeded its tensors
                tool.graph.valid_shape = True
            tool.graph.profile()
    except Exception as exc:  # noqa: BLE001 - the counter must never fail a build; the rows stay, uncounted
        return _Counted([None] * len(nodes), {}, f"{COUNTER} could not count this graph: {type(exc).__name__}: {exc}")
    counts: list[int | None] = []
    for i, node in enumerate(nodes):
        t = tool.graph.nodemap.get(f"{node.op_type}_{i}")
        # on ONNX's shapes, a node with a tensor of unknown shape would be counted on a made-up one
        shaped = own_shapes or all(name in g.shapes for name in [*node.input, *node.output] if name)
        counts.append(None if t is None or type(t) is Unprofiled or not shaped else int(t.macs[0]))
    if not own_shapes:
        return _Counted(counts, {})
    # it evaluates shape arithmetic (Shape -> Slice -> Concat -> Reshape) that ONNX shape inference leaves open
    shapes = {name: [int(d) for d in t.get_shape()] for name, t in tool.graph.tensormap.items()
              if all(isinstance(d, (int, np.integer)) for d in t.get_shape())}
    return _Counted(counts, shapes)


def _params_by_node(g: _Graph) -> list[int]:
    """Initializer elements per node, each initializer at its first consumer."""
    seen: set[str] = set()
    out = []
    for node in g.model.graph.node:
        fresh = [name for name in node.input if name in g.inits and name not in seen]
        seen.update(fresh)
        out.append(int(sum(g.inits[name].size for name in fresh)))
    return out


def _outputs(node: Any, g: _Graph) -> list[dict[str, Any]]:
    import onnx

    return [{"name": name, "shape": g.shapes.get(name),
             "dtype": onnx.TensorProto.DataType.Name(g.dtypes.get(name, 0)).lower()}
            for name in node.output if name]


def analyze_layers(path: Path, inputs: dict[str, list[int]] | None = None) -> tuple[list[Layer], _Graph, str | None]:
    """One :class:`Layer` per node of ``path``'s graph, in graph order; the graph; why the counter
    could not count (None when it could). ``inputs``: the spec's input shapes, for symbolic dims."""
    g = _load(path, inputs)
    counted = _count(g)
    for name, shape in counted.shapes.items():
        g.shapes.setdefault(name, shape)
    params = _params_by_node(g)
    layers = []
    for i, node in enumerate(g.model.graph.node):
        own = _OWN.get(node.op_type)
        count = own(node, g) if own and counted.error is None else counted.counts[i]
        mac = node.op_type in MAC_OPS
        layers.append(Layer(index=i, name=node.name or f"{node.op_type}_{i}", op=node.op_type,
                            outputs=_outputs(node, g), params=params[i],
                            macs=(count or 0) if mac else 0, ops=0 if mac else (count or 0),
                            activation_bytes=sum(_nbytes(g, o) for o in node.output),
                            counted=count is not None))
    return layers, g, counted.error


def _activation_peak(g: _Graph) -> int:
    """Peak bytes of live tensors, nodes in graph order, each freed after its last consumer."""
    nodes = g.model.graph.node
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in g.model.graph.output}
    live = {i.name: _nbytes(g, i.name) for i in g.model.graph.input if i.name not in g.inits}
    peak = sum(live.values())
    for i, node in enumerate(nodes):
        for name in node.output:
            live[name] = _nbytes(g, name)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= i and name not in outputs:
                del live[name]
    return peak


def _by_op(layers: list[Layer]) -> list[dict[str, Any]]:
    """Per op type: how many layers and what they add up to, the largest MACs (then ops) first."""
    table: dict[str, dict[str, Any]] = {}
    for layer in layers:
        row = table.setdefault(layer.op, {"op": layer.op, "layers": 0, "params": 0, "macs": 0, "ops": 0,
                                          "activation_bytes": 0, "counted": True})
        row["layers"] += 1
        for key in ("params", "macs", "ops", "activation_bytes"):
            row[key] += getattr(layer, key)
        row["counted"] = row["counted"] and layer.counted
    return sorted(table.values(), key=lambda r: (-r["macs"], -r["ops"], r["op"]))


def _totals(layers: list[Layer], g: _Graph, error: str | None) -> dict[str, Any]:
    """The model's totals (the release manifest's ``analysis`` block; see the module docstring)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        counter = f"{COUNTER} {version(COUNTER)}"
    except PackageNotFoundError:  # not installed: every layer is uncounted and counter_error says why
        counter = COUNTER
    macs = sum(layer.macs for layer in layers)
    by_op = _by_op(layers)
    out: dict[str, Any] = {
        "params": int(sum(a.size for a in g.inits.values())),
        "param_bytes": int(sum(a.nbytes for a in g.inits.values())),
        "macs": macs,
        "flops": 2 * macs,
        "ops": sum(layer.ops for layer in layers),
        "macs_by_op": {r["op"]: r["macs"] for r in by_op if r["macs"]},
        "ops_by_op": {r["op"]: r["ops"] for r in by_op if r["ops"]},
        "activation_bytes_total": sum(layer.activation_bytes for layer in layers),
        "activation_bytes_peak": _activation_peak(g),
        "nodes": len(layers),
        "uncounted_ops": sorted({layer.op for layer in layers if not layer.counted}),
        "counter": counter,
    }
    if error:
        out["counter_error"] = error
    return out


def analyze_onnx(path: Path, inputs: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """The model's totals: parameters, MACs, FLOPs, other ops, activation memory (see above)."""
    layers, g, error = analyze_layers(path, inputs)
    return _totals(layers, g, error)


def analysis_document(path: Path, inputs: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """What ``edgeship analyze --json`` writes: the totals, the per-op-type summary, every layer."""
    layers, g, error = analyze_layers(path, inputs)
    return {"totals": _totals(layers, g, error), "by_op": _by_op(layers),
            "layers": [asdict(layer) for layer in layers]}


def format_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


LAYER_COLUMNS = ("#", "layer", "op", "output", "params", "MACs", "ops", "activations", "MACs %")
OP_COLUMNS = ("op", "layers", "params", "MACs", "ops", "activations", "MACs %")


def _shapes_text(outputs: list[dict[str, Any]]) -> str:
    return ", ".join("x".join(map(str, o["shape"])) if o["shape"] is not None else "?" for o in outputs)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def _count_text(n: int, counted: bool) -> str:
    return format_count(n) if counted else "?"  # ?: the counter does not know this op type


def top_layers(layers: list[dict[str, Any]], top: int | None) -> list[dict[str, Any]]:
    """The ``top`` layers with the most MACs (then ops, then activation bytes), or all in graph order."""
    if top is None:
        return layers
    return sorted(layers, key=lambda r: (-r["macs"], -r["ops"], -r["activation_bytes"], r["index"]))[:top]


def print_analysis(doc: dict[str, Any], console: Any, top: int | None) -> None:
    """The totals, a table of layers (``top`` by MACs, or every one when None) and one of op types."""
    from pipeline.validate.report import print_table, size

    t, layers = doc["totals"], doc["layers"]
    console.print(f"{doc['spec']}: params {format_count(t['params'])} ({size(t['param_bytes'])}), "
                  f"MACs {format_count(t['macs'])} (FLOPs {format_count(t['flops'])}), other ops "
                  f"{format_count(t['ops'])}, activations peak {size(t['activation_bytes_peak'])} / total "
                  f"{size(t['activation_bytes_total'])}, per batch of {doc['batch']}; {t['nodes']} layers",
                  markup=False, highlight=False, soft_wrap=True)
    shown = top_layers(layers, top)
    title = ("every layer, in graph order" if top is None or len(shown) == len(layers) else
             f"the {len(shown)} layers with the most MACs, of {len(layers)} (--all: every layer)")
    print_table(console, title, LAYER_COLUMNS,
                [[str(r["index"]), r["name"], r["op"], _shapes_text(r["outputs"]), format_count(r["params"]),
                  _count_text(r["macs"], r["counted"]), _count_text(r["ops"], r["counted"]),
                  size(r["activation_bytes"]), _share(r["macs"], t["macs"])] for r in shown],
                [False] * len(shown), left=("layer", "op", "output"))
    print_table(console, "by op type", OP_COLUMNS,
                [[r["op"], str(r["layers"]), format_count(r["params"]), _count_text(r["macs"], r["counted"]),
                  _count_text(r["ops"], r["counted"]), size(r["activation_bytes"]), _share(r["macs"], t["macs"])]
                 for r in doc["by_op"]], [False] * len(doc["by_op"]), left=("op",))
    for line in _notes(doc):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _notes(doc: dict[str, Any]) -> list[str]:
    t, opt = doc["totals"], doc.get("optimize") or {}
    notes = [f"MACs: multiply-accumulates of convolutions and matrix products, bias adds included; ops: every "
             f"other layer's arithmetic, per element as {t['counter']} weighs it; activations: a layer's outputs"]
    if t["uncounted_ops"]:
        notes.append(f"not counted (? above; {t['counter']} does not know them): {', '.join(t['uncounted_ops'])}")
    if t.get("counter_error"):
        notes.append(t["counter_error"])
    if opt:
        notes.append(f"BatchNormalization nodes: {opt.get('ops_before', {}).get('BatchNormalization', 0)} exported, "
                     f"{opt.get('bn_folded', 0)} folded by edgeship, {opt.get('bn_left', 0)} left")
    return notes
