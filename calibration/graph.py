"""ONNX graph helpers: hashes, activation tensors, weighted layers.

onnx is imported lazily so that ``import calibration`` stays light.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibration.errors import CalibrationError

if TYPE_CHECKING:
    import onnx

#: ops whose weight input is quantized per output channel.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT = 1  # onnx.TensorProto.FLOAT


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: Path) -> onnx.ModelProto:
    """Load an ONNX model (with external data) or raise a one-line error naming the file."""
    import onnx

    try:
        return onnx.load(str(path))
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:  # type: ignore[attr-defined]
        raise CalibrationError(f"cannot load ONNX model {str(path)!r}: {exc}") from exc


def ensure_node_names(model: onnx.ModelProto) -> bool:
    """Give every unnamed node a unique name (layer fallback addresses nodes by name).

    Returns:
        True if the model was changed.
    """
    used = {n.name for n in model.graph.node if n.name}
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            changed = True
    return changed


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float activation tensors in topological order: graph inputs and node outputs.

    Initializers and Constant outputs are weights, not activations; tensors whose type is
    unknown after shape inference are skipped (they are typically shape arithmetic).
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    for vi in model.graph.input:
        if vi.name not in inits and types.get(vi.name) == _FLOAT:
            names.append(vi.name)
            seen.add(vi.name)
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape", "ConstantOfShape"):
            continue
        for out in node.output:
            if out and out not in seen and types.get(out) == _FLOAT:
                names.append(out)
                seen.add(out)
    return names


@dataclass(frozen=True)
class WeightedLayer:
    """A node with a constant weight that is quantized per output channel.

    Attributes:
        node: node name.
        op: op type.
        weight: initializer name of the weight.
        axis: output-channel axis of the weight tensor.
        inputs: activation input tensor names of the node.
        output: the node's first output.
    """

    node: str
    op: str
    weight: str
    axis: int
    inputs: tuple[str, ...]
    output: str


def weighted_layers(model: onnx.ModelProto) -> list[WeightedLayer]:
    """List Conv/ConvTranspose/Gemm/MatMul nodes whose weight is an initializer.

    The output-channel axis follows each op's weight layout: Conv (M, C/g, kH, kW) -> 0,
    ConvTranspose (C, M/g, kH, kW) -> 1, Gemm B -> 0 if transB else 1, MatMul B (K, N) -> last.
    """
    inits = {i.name: i for i in model.graph.initializer}
    layers: list[WeightedLayer] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = len(w.dims) - 1
        if len(w.dims) < 2:
            continue
        acts = tuple(i for i in node.input[:1] if i and i not in inits)
        layers.append(WeightedLayer(node.name, node.op_type, w.name, axis, acts, node.output[0]))
    return layers


def consumer_map(graph: "onnx.GraphProto") -> "dict[str, list[onnx.NodeProto]]":
    """Tensor name -> the nodes that read it, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            found.setdefault(name, []).append(n)
    return found


def producer_map(graph: "onnx.GraphProto") -> "dict[str, onnx.NodeProto]":
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def tensor_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor -> its dimensions after ONNX shape inference (0 where a dimension is not a number);
    tensors whose shape inference could not tell are left out."""
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in (*g.input, *g.value_info, *g.output) if vi.type.tensor_type.HasField("shape")}


def initializer_array(model: onnx.ModelProto, name: str):  # -> np.ndarray
    """Return an initializer as a numpy array (raises CalibrationError if absent)."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise CalibrationError(f"initializer {name!r} not found in the model")


def model_with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` whose graph outputs also include ``names`` (float tensors)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for n in names:
        if n not in existing:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return out


def replace_nodes(graph: "onnx.GraphProto", nodes: "list[onnx.NodeProto]") -> None:
    """Make ``nodes`` the graph's node list, in this order (a protobuf repeated field is edited in
    place: cleared, then extended)."""
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unused_initializers(graph: "onnx.GraphProto") -> None:
    """Remove the initializers no node reads and no graph output names (what a rewrite left behind)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
