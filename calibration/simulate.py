"""Gated fake-quantization model: any subset of layers quantized, one onnxruntime session.

Layer sensitivity needs the model evaluated with many different sets of quantized layers.
Writing and loading one QDQ model per set would cost a quantizer run and a session each, so we
build one float model in which every weighted layer L has

* its output computed as ``op(x', W) + g_L * op(x', fq(W) - W)`` (fq: per-channel
  quantize-dequantize; the op is linear in its weight, so this is ``op(x', fq(W))`` when
  g_L = 1), and
* its activation input replaced by ``x' = x + g_L * (DQ(Q(x)) - x)``,

with ``g_L`` a scalar graph input. Both weights stay constants: onnxruntime pre-packs constant
conv weights, and a weight computed at run time (``W + g * delta``) made the model ~15x slower. Feeding g_L = 1 quantizes L, g_L = 0 leaves it in float.
The numbers match a QDQ model up to int32 accumulation rounding; the real writer confirms the
final choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.graph import WeightedLayer, replace_nodes
from calibration.observers import QParams


@dataclass
class GatedModel:
    """A gated fake-quant model and how to drive it.

    Attributes:
        session: onnxruntime session.
        layers: gated layers, in graph order.
        gate_names: graph input name of each layer's gate.
        input_name: the model's data input.
        output_name: the model's first output.
    """

    session: Any
    layers: list[WeightedLayer]
    gate_names: list[str]
    input_name: str
    output_name: str
    output_names: list[str] = field(default_factory=list)
    """every output of the model, in graph order (the first is ``output_name``)"""

    def run(self, samples: np.ndarray, on: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """First output with layer i quantized where ``on[i]`` is true."""
        return self.run_all(samples, on, batch_size, [self.output_name])[self.output_name]

    def run_all(self, samples: np.ndarray, on: np.ndarray, batch_size: int = 32,
                names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every output (or ``names``) by name with layer i quantized where ``on[i]`` is true."""
        names = names or self.output_names or [self.output_name]
        feeds_g = {g: np.array(1.0 if v else 0.0, np.float32) for g, v in zip(self.gate_names, on)}
        data = next(i for i in self.session.get_inputs() if i.name == self.input_name)
        fixed = data.shape[0] if data.shape and isinstance(data.shape[0], int) and data.shape[0] > 0 else None
        bs = fixed or batch_size
        outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in range(0, samples.shape[0], bs):
            batch = samples[s : s + bs]
            real = batch.shape[0]
            if fixed and real < fixed:
                # a fixed-batch model: pad the last batch, drop the padded rows from the output
                batch = np.concatenate([batch, np.repeat(batch[-1:], fixed - real, axis=0)])
            feeds = {self.input_name: np.ascontiguousarray(batch), **feeds_g}
            for n, o in zip(names, self.session.run(names, feeds)):
                outs[n].append(o[:real])
        return {n: np.concatenate(o).astype(np.float32, copy=False) for n, o in outs.items()}


def _weight_twin(g: Any, node: Any, weight: str, wq: QParams, inits: dict[str, np.ndarray], i: int, gate: str,
                 bias: dict[str, np.ndarray] | None) -> list[Any]:
    """Nodes after ``node`` that add ``gate`` x (the quantized weight's error, and the bias
    correction) through a twin of the node: the layer's output moves from float to int8 with the gate."""
    import onnx
    from onnx import helper, numpy_helper

    w = inits[weight].astype(np.float32)
    shape = [1] * w.ndim
    shape[wq.axis if wq.axis is not None else 0] = -1
    s = np.asarray(wq.scale, np.float32).reshape(shape if wq.axis is not None else ())
    delta = (np.clip(np.round(w / s), -128, 127) * s - w).astype(np.float32)
    dname = f"{weight}__edgeship_dq_delta_{i}"
    g.initializer.append(numpy_helper.from_array(delta, dname))
    y = node.output[0]
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    twin.name = f"{node.name}__edgeship_delta"
    del twin.input[2:]  # the main node adds the original bias once
    b_name = node.input[2] if len(node.input) > 2 else ""
    if bias and b_name in bias:
        db = (bias[b_name] - inits[b_name]).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(db, f"{b_name}__edgeship_db_{i}"))
        twin.input.append(f"{b_name}__edgeship_db_{i}")
    twin.input[1] = dname
    twin.output[0] = f"{y}__edgeship_delta"
    node.output[0] = f"{y}__edgeship_main"
    return [
        twin,
        helper.make_node("Mul", [twin.output[0], gate], [f"{y}__edgeship_delta_g"]),
        helper.make_node("Add", [node.output[0], f"{y}__edgeship_delta_g"], [y]),
    ]


def _gated_inputs(g: Any, consumers: tuple[Any, ...], inputs: list[str], acts: dict[str, QParams], i: int,
                  gate: str) -> list[Any]:
    """Nodes before the layer that fake-quantize each of its ``inputs`` by ``gate``
    (x + gate * (QDQ(x) - x)); ``consumers`` (the node and its weight twin) read the gated copy."""
    import onnx
    from onnx import helper, numpy_helper

    pre: list[Any] = []
    for x in inputs:
        q = acts.get(x)
        if q is None:
            continue
        base = f"{x}__edgeship_fq_{i}"
        zp_type = onnx.TensorProto.INT8 if q.dtype == "int8" else onnx.TensorProto.UINT8
        g.initializer.append(numpy_helper.from_array(np.array(q.scale, np.float32), f"{base}_s"))
        g.initializer.append(helper.make_tensor(f"{base}_z", zp_type, [], [int(q.zero_point)]))
        pre += [
            helper.make_node("QuantizeLinear", [x, f"{base}_s", f"{base}_z"], [f"{base}_q"]),
            helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_s", f"{base}_z"], [f"{base}_dq"]),
            helper.make_node("Sub", [f"{base}_dq", x], [f"{base}_e"]),
            helper.make_node("Mul", [f"{base}_e", gate], [f"{base}_eg"]),
            helper.make_node("Add", [x, f"{base}_eg"], [f"{base}_x"]),
        ]
        for node_ in consumers:
            for k, name in enumerate(node_.input):
                if name == x:
                    node_.input[k] = f"{base}_x"
    return pre


def build_gated_model(
    model: Any,
    layers: list[WeightedLayer],
    acts: dict[str, QParams],
    weights: dict[str, QParams],
    threads: int | None = None,
    bias: dict[str, np.ndarray] | None = None,
) -> GatedModel:
    """Build the gated model from the fp32 ``model`` (an onnx.ModelProto, not modified).

    Args:
        model: fp32 model.
        layers: the layers to gate.
        acts: activation parameters (a layer's input without parameters stays float).
        weights: weight parameters per initializer.
        threads: onnxruntime intra-op threads.
        bias: corrected biases (bias correction is part of quantizing a layer, so it is gated
            with it: the twin node adds ``corrected - original``).
    """
    import onnx
    from onnx import helper, numpy_helper

    from calibration.runtime import make_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    by_name = {n.name: n for n in g.node}
    # nodes inserted (before, after) the named node
    new_nodes: dict[str, tuple[list[onnx.NodeProto], list[onnx.NodeProto]]] = {}
    gate_names: list[str] = []
    for i, layer in enumerate(layers):
        gate = f"__edgeship_gate_{i}"
        gate_names.append(gate)
        g.input.append(helper.make_tensor_value_info(gate, onnx.TensorProto.FLOAT, []))
        node = by_name[layer.node]
        wq = weights.get(layer.weight)
        post = [] if wq is None else _weight_twin(g, node, layer.weight, wq, inits, i, gate, bias)
        pre = _gated_inputs(g, (node, *post[:1]), layer.inputs, acts, i, gate)
        new_nodes[layer.node] = (pre, post)
    ordered: list[onnx.NodeProto] = []
    for n in g.node:
        before, after = new_nodes.get(n.name, ([], []))
        ordered.extend(before)
        ordered.append(n)
        ordered.extend(after)
    replace_nodes(g, ordered)
    session = make_session(m.SerializeToString(), threads=threads)
    data_input = next(i.name for i in session.get_inputs() if not i.name.startswith("__edgeship_gate_"))
    names = [o.name for o in session.get_outputs()]
    return GatedModel(session, list(layers), gate_names, data_input, names[0], names)
