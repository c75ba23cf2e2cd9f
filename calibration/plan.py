"""A quantization plan: activation ranges and parameters plus weight parameters for one method.

The plan mirrors two rules of ONNX Runtime's QDQ quantizer so the parameters we report are the
ones written: ops that only move data (MaxPool, Reshape, Transpose, ...) reuse their input's
parameters for their output, and weights are floored so the int32 bias cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.graph import WeightedLayer, consumer_map, initializer_array, producer_map
from calibration.observers import QParams, compute_ranges, qparams, weight_qparams
from calibration.stats import Statistics

#: ops whose output ORT quantizes with the input's parameters (registry: QDQDirect8BitOp etc.)
SHARE_INPUT_PARAMS = (
    "MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "AveragePool",
    "Slice", "Split", "Gather", "GatherElements", "Resize", "Pad", "TopK",
)


@dataclass
class QuantPlan:
    """Everything a writer needs.

    Attributes:
        method: the observer used.
        symmetric: activation mode.
        ranges: activation tensor -> (lo, hi).
        acts: activation tensor -> parameters.
        weights: weight initializer -> parameters.
        layers: the weighted layers.
        bias: bias initializer -> bias-corrected values (see :func:`bias_correction`).
        rounded: weight initializer -> float weights ``s * q`` whose rounding AdaRound learned
            (:mod:`calibration.adaround`); each backend's round-to-nearest gives back ``q``.
    """

    method: str
    symmetric: bool
    ranges: dict[str, tuple[float, float]]
    acts: dict[str, QParams]
    weights: dict[str, QParams]
    layers: list[WeightedLayer]
    bias: dict[str, np.ndarray] = field(default_factory=dict)
    rounded: dict[str, np.ndarray] = field(default_factory=dict)


def make_plan(
    model: Any,
    stats: Statistics,
    layers: list[WeightedLayer],
    method: str,
    symmetric: bool,
    per_channel: bool = True,
    percentile: float = 99.99,
    correct_bias: bool = True,
) -> QuantPlan:
    """Compute the plan for ``method`` from cached statistics (no model run).

    Args:
        model: the fp32 onnx.ModelProto.
        stats: activation statistics.
        layers: weighted layers of ``model``.
        method: observer name.
        symmetric: activation mode.
        per_channel: weights per output channel.
        percentile: for the percentile observer.
        correct_bias: fold the expected output shift of weight quantization into the bias.
    """
    ranges = compute_ranges(stats, method, symmetric, percentile)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        # A tensor read only by Relu/Clip is worth quantizing only over what the activation
        # lets through: ORT folds the activation into the preceding Q in asymmetric mode, and
        # in symmetric mode (activation kept) a pre-ReLU6 range of +-200 would leave the [0, 6]
        # that survives with a step of ~1.5.
        if node.op_type in ("Relu", "Clip") and node.output[0] in ranges:
            x = node.input[0]
            if x in ranges and consumers.get(x) == 1 and x not in graph_outputs:
                ranges[x] = ranges[node.output[0]]
    for node in model.graph.node:
        if node.op_type in SHARE_INPUT_PARAMS and node.input and node.input[0] in ranges:
            for out in node.output:
                if out in ranges:
                    ranges[out] = ranges[node.input[0]]
    acts = {n: qparams(lo, hi, symmetric) for n, (lo, hi) in ranges.items()}
    inits = {i.name for i in model.graph.initializer}
    weights: dict[str, QParams] = {}
    nodes = {n.name: n for n in model.graph.node}
    for layer in layers:
        node = nodes[layer.node]
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        in_q = acts.get(layer.inputs[0]) if layer.inputs else None
        weights[layer.weight] = weight_qparams(
            initializer_array(model, layer.weight),
            layer.axis,
            per_channel,
            bias=initializer_array(model, bias_name) if bias_name else None,
            input_scale=float(in_q.scale) if in_q is not None else None,
        )
    plan = QuantPlan(method, symmetric, ranges, acts, weights, layers)
    if correct_bias:
        plan.bias = bias_correction(model, plan, stats)
    return plan


def bias_correction(model: Any, plan: QuantPlan, stats: Statistics) -> dict[str, np.ndarray]:
    """Corrected biases that cancel the mean output shift caused by weight quantization.

    Rounding a layer's weights moves its output by E[(W_q - W) x] = (W_q - W) E[x] per output
    channel, a systematic error that adds up across layers (depthwise convs with few taps per
    channel suffer most). With the per-channel input means from the statistics, the shift is
    computed exactly and subtracted from the bias (Nagel et al., "Data-Free Quantization",
    2019, empirical variant). Padding borders are ignored (they see zeros, not the mean).

    Returns:
        bias initializer name -> corrected float32 values (Conv and Gemm with a bias).
    """
    from onnx import helper

    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for layer in plan.layers:
        node = nodes[layer.node]
        if layer.op not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        t = stats.tensors.get(layer.inputs[0]) if layer.inputs else None
        wq = plan.weights.get(layer.weight)
        if t is None or t.channel_mean is None or wq is None:
            continue
        w = initializer_array(model, layer.weight).astype(np.float64)
        shape = [1] * w.ndim
        shape[layer.axis] = -1
        s = np.asarray(wq.scale, np.float64).reshape(shape if wq.axis is not None else ())
        # learned rounding (plan.rounded) shifts the output too: correct what it leaves
        learned = plan.rounded.get(layer.weight)
        dw = (learned.astype(np.float64) if learned is not None else np.clip(np.round(w / s), -128, 127) * s) - w
        mu = np.asarray(t.channel_mean, np.float64)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if layer.op == "Conv":
            m, cpg = w.shape[0], w.shape[1]
            groups = int(attrs.get("group", 1))
            if mu.shape[0] != cpg * groups:
                continue
            mu_out = mu.reshape(groups, cpg)[np.arange(m) // (m // groups)]  # (M, C/g)
            shift = (dw.reshape(m, cpg, -1).sum(axis=2) * mu_out).sum(axis=1)
        else:
            if int(attrs.get("transA", 0)) or mu.ndim != 1:
                continue
            shift = dw @ mu if layer.axis == 0 else mu @ dw
            shift = shift * float(attrs.get("alpha", 1.0)) / float(attrs.get("beta", 1.0))
        b = initializer_array(model, node.input[2]).astype(np.float64)
        if b.shape != shift.shape:
            continue
        out[node.input[2]] = (b - shift).astype(np.float32)
    return out


def corrected_model(model: Any, plan: QuantPlan, float_nodes: list[str] | None = None) -> Any:
    """Copy of ``model`` with the plan's corrected biases and learned weight rounding (layers kept
    in float keep their own)."""
    import onnx
    from onnx import numpy_helper

    keep = {i for n in model.graph.node if n.name in set(float_nodes or []) for i in n.input[1:3]}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        new = plan.bias.get(init.name, plan.rounded.get(init.name))
        if new is not None and init.name not in keep:
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    return m


def float_tensors_for(model: Any, float_nodes: list[str]) -> set[str]:
    """Activation tensors to leave unquantized so that ``float_nodes`` really see float input.

    ORT quantizes a tensor wherever it has a range, including at the output of the producing
    node; excluding only the consumer would still feed it dequantized int8. So for each float
    node we drop its input tensor when every consumer of that tensor is a float node, then walk
    back through single-consumer ReLU/Clip and data-movement ops (which ORT would fold into, or
    share parameters with, the producer's output quantization).
    """
    nodes = set(float_nodes)
    producer = producer_map(model.graph)
    consumers = consumer_map(model.graph)
    passthrough = ("Relu", "Clip", *SHARE_INPUT_PARAMS)
    dropped: set[str] = set()
    for n in model.graph.node:
        if n.name not in nodes or not n.input:
            continue
        x = n.input[0]
        while x and all(c.name in nodes or c.output[0] in dropped for c in consumers.get(x, [])):
            dropped.add(x)
            p = producer.get(x)
            if p is None or p.op_type not in passthrough or len(consumers.get(p.input[0], [])) != 1:
                break
            x = p.input[0]
    return dropped
