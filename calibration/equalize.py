"""Cross-layer equalisation (CLE; Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1), on an fp32 ONNX graph with BatchNorm folded.

For two convolutions in a row, ``conv1 -> act -> conv2``, where ``act`` is nothing, Relu (or,
see below, ReLU6) and each tensor between them has exactly one consumer, scaling output channel
``i`` of conv1 by ``1 / s_i`` and input channel ``i`` of conv2 by ``s_i`` leaves the function
unchanged, because ``relu(x / s) = relu(x) / s`` for ``s > 0``. With ``r1_i`` the range of conv1's
output channel ``i`` and ``r2_i`` that of conv2's input channel ``i``, ``s_i = sqrt(r1_i * r2_i) / r2_i``
makes both ``sqrt(r1_i * r2_i)``: per-channel weight ranges that differ by orders of magnitude
(the depthwise convolutions of MobileNet-style models) come closer together, which is what a
per-tensor int8 scale needs. Pairs share convolutions in a chain (expand -> depthwise ->
project), so the pass is repeated until the scales stop moving.

ReLU6 (``Clip(0, 6)``) is *not* invariant: ``clip(x / s, 0, 6) != clip(x, 0, 6) / s`` once ``x``
exceeds ``6 min(1, s)``. Two treatments (``relu6``):

* ``"skip"`` (the library default): pairs joined by a Clip are left alone; the fp32 function is
  unchanged exactly. On MobileNetV2 and EfficientNet-Lite0 this leaves almost no pair.
* ``"relu"`` (the paper's choice for MobileNetV2): the Clip of an equalised pair becomes a Relu.
  The fp32 function then differs wherever an activation exceeded 6; a caller must judge the
  result against the *original* fp32 model (the INT8 search does: its reference is the model
  before equalisation).

Numpy and onnx only; the input model is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from calibration.errors import CalibrationConfigError
from calibration.graph import consumer_map, producer_map

if TYPE_CHECKING:
    import onnx

Relu6Mode = Literal["skip", "relu"]
RELU6_MODES = ("skip", "relu")
#: a channel whose weights are all (nearly) zero carries nothing to balance; it keeps s = 1
_DEAD = 1e-12


@dataclass(frozen=True)
class Pair:
    """Two convolutions CLE balances: ``first``'s output channels against ``second``'s input
    channels; ``act`` the node between them (None: directly connected)."""

    first: str
    second: str
    act: str | None
    act_op: str | None
    depthwise_second: bool


@dataclass
class EqualizeReport:
    """What one equalisation did (JSON-able through ``to_dict``)."""

    pairs: list[Pair] = field(default_factory=list)
    skipped_relu6: int = 0
    relu6_replaced: list[str] = field(default_factory=list)
    iterations: int = 0
    max_scale_change: float = 0.0
    #: max/min ratio of per-output-channel weight ranges per equalised conv, before and after
    range_ratio: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"pairs": len(self.pairs), "skipped_relu6_pairs": self.skipped_relu6,
                "relu6_replaced_by_relu": len(self.relu6_replaced), "iterations": self.iterations,
                "max_scale_change": round(self.max_scale_change, 6),
                "median_range_ratio_before": _median([b for b, _ in self.range_ratio.values()]),
                "median_range_ratio_after": _median([a for _, a in self.range_ratio.values()])}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


class _Graph:
    """Index of one model: producers, consumers, initializers by name (arrays are copies)."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        from onnx import numpy_helper

        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = producer_map(model.graph)
        self.consumers = consumer_map(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.init = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}

    def sole_consumer(self, tensor: str) -> "onnx.NodeProto | None":
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def owned_weight(self, node: "onnx.NodeProto", index: int) -> bool:
        """The node's input ``index`` is an initializer no other node reads (scaling it is local)."""
        return (len(node.input) > index and node.input[index] in self.init
                and len(self.consumers.get(node.input[index], [])) == 1)


def _attr(node: "onnx.NodeProto", name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def clip_bounds(graph: _Graph, node: "onnx.NodeProto") -> tuple[float | None, float | None]:
    """A Clip's (min, max) from its constant inputs or (opset < 11) attributes; None: unbounded."""
    bounds: list[float | None] = [None, None]
    for k, key in enumerate(("min", "max")):
        if len(node.input) > k + 1 and node.input[k + 1]:
            value = graph.init.get(node.input[k + 1])
            if value is None:
                return (float("nan"), float("nan"))  # computed bounds: not a ReLU6 we can reason about
            bounds[k] = float(value)
        for a in node.attribute:
            if a.name == key:
                bounds[k] = float(a.f)
    return bounds[0], bounds[1]


def _activation_kind(graph: _Graph, node: "onnx.NodeProto") -> str | None:
    """'relu' (positive-scaling invariant), 'relu6' (Clip(0, 6)) or None (anything else)."""
    if node.op_type == "Relu":
        return "relu"
    if node.op_type == "Clip":
        lo, hi = clip_bounds(graph, node)
        if lo == 0.0 and hi is None:
            return "relu"
        if lo == 0.0 and hi is not None and hi > 0.0:
            return "relu6"
    return None


def _is_plain_conv(graph: _Graph, node: "onnx.NodeProto") -> bool:
    return node.op_type == "Conv" and graph.owned_weight(node, 1) and (len(node.input) < 3 or not node.input[2]
                                                                       or graph.owned_weight(node, 2))


def _second(graph: _Graph, node: "onnx.NodeProto", channels: int) -> bool | None:
    """Whether ``node`` can be the second of a pair over ``channels`` channels: True depthwise,
    False dense (group 1), None neither (grouped, shared weight, another op)."""
    if not _is_plain_conv(graph, node):
        return None
    group, w = _attr(node, "group", 1), graph.init[node.input[1]]
    if group == 1 and w.shape[1] == channels:
        return False
    if group == channels and w.shape[0] == channels and w.shape[1] == 1:
        return True
    return None


def find_pairs(model: "onnx.ModelProto", relu6: Relu6Mode = "skip") -> tuple[list[Pair], int]:
    """Every conv -> [Relu | Clip(0, c)] -> conv pair CLE may balance, in graph order, and the
    number of ReLU6 pairs left out (``relu6="skip"``). Nodes must be named
    (``calibration.graph.ensure_node_names``)."""
    if relu6 not in RELU6_MODES:
        raise CalibrationConfigError(f"relu6 {relu6!r} unknown; choose one of {', '.join(RELU6_MODES)}")
    graph, pairs, skipped = _Graph(model), [], 0
    for node in model.graph.node:
        if not _is_plain_conv(graph, node):
            continue
        channels = int(graph.init[node.input[1]].shape[0])
        nxt, act, kind = graph.sole_consumer(node.output[0]), None, None
        if nxt is not None and nxt.op_type in ("Relu", "Clip"):
            act, kind = nxt, _activation_kind(graph, nxt)
            nxt = graph.sole_consumer(nxt.output[0]) if kind else None
        if nxt is None or (depthwise := _second(graph, nxt, channels)) is None:
            continue
        if kind == "relu6" and relu6 == "skip":
            skipped += 1
            continue
        pairs.append(Pair(node.name, nxt.name, act.name if act else None, kind, depthwise))
    return pairs, skipped


def _in_axis_absmax(w: np.ndarray, depthwise: bool) -> np.ndarray:
    """Range of each input channel of a conv weight (O, I/g, kh, kw)."""
    axis = 0 if depthwise else 1
    return np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)


def out_channel_ranges(w: np.ndarray) -> np.ndarray:
    """Range (max |w|) of each output channel of a weight laid out (O, ...)."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def range_ratio(w: np.ndarray) -> float:
    """max/min of the per-output-channel ranges over the live channels (1.0: perfectly even)."""
    r = out_channel_ranges(w)
    r = r[r > _DEAD]
    return float(r.max() / r.min()) if r.size else 1.0


def pair_scales(w1: np.ndarray, w2: np.ndarray, depthwise_second: bool) -> np.ndarray:
    """``s_i = sqrt(r1_i * r2_i) / r2_i``; a channel dead on either side keeps 1."""
    r1, r2 = out_channel_ranges(w1), _in_axis_absmax(w2, depthwise_second)
    live = (r1 > _DEAD) & (r2 > _DEAD)
    s = np.ones_like(r1, dtype=np.float64)
    s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
    return s


def _apply(graph: _Graph, pair: Pair) -> float:
    """Scale one pair in place (in ``graph.init``); return max |s - 1|."""
    first, second = graph.nodes[pair.first], graph.nodes[pair.second]
    w1, w2 = graph.init[first.input[1]], graph.init[second.input[1]]
    s = pair_scales(w1, w2, pair.depthwise_second)
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    graph.init[first.input[1]] = (w1 / s.reshape(shape1)).astype(w1.dtype)
    if len(first.input) > 2 and first.input[2]:
        b1 = graph.init[first.input[2]]
        graph.init[first.input[2]] = (b1 / s).astype(b1.dtype)
    shape2 = shape1 if pair.depthwise_second else (1, -1) + (1,) * (w2.ndim - 2)
    graph.init[second.input[1]] = (w2 * s.reshape(shape2)).astype(w2.dtype)
    return float(np.abs(s - 1.0).max()) if s.size else 0.0


def equalize(model: "onnx.ModelProto", relu6: Relu6Mode = "skip", max_iterations: int = 20,
             tol: float = 1e-4) -> tuple["onnx.ModelProto", EqualizeReport]:
    """A copy of ``model`` with every pair of :func:`find_pairs` equalised.

    Args:
        model: fp32 ONNX model, BatchNorm folded (the optimize stage's output).
        relu6: what to do with Clip(0, 6) between a pair (module docstring).
        max_iterations: passes over all pairs at most.
        tol: stop when no scale of a pass differs from 1 by more than this.
    """
    import onnx
    from onnx import numpy_helper

    from calibration.graph import ensure_node_names

    out = onnx.ModelProto()
    out.CopyFrom(model)
    ensure_node_names(out)  # pairs address nodes by name
    pairs, skipped = find_pairs(out, relu6)
    graph = _Graph(out)
    report = EqualizeReport(pairs=pairs, skipped_relu6=skipped)
    convs = list(dict.fromkeys(n for p in pairs for n in (p.first, p.second)))
    firsts = list(dict.fromkeys(p.first for p in pairs))  # their output channels are the ones balanced
    before = {c: range_ratio(graph.init[graph.nodes[c].input[1]]) for c in firsts}
    for report.iterations in range(1, max_iterations + 1):
        report.max_scale_change = max((_apply(graph, p) for p in pairs), default=0.0)
        if report.max_scale_change < tol:
            break
    report.range_ratio = {c: (before[c], range_ratio(graph.init[graph.nodes[c].input[1]])) for c in firsts}
    changed = {n for c in convs for n in graph.nodes[c].input[1:3] if n}
    for t in out.graph.initializer:
        if t.name in changed:
            t.CopyFrom(numpy_helper.from_array(graph.init[t.name], t.name))
    for p in pairs:
        if p.act_op == "relu6":
            _to_relu(graph.nodes[p.act])
            report.relu6_replaced.append(p.act)
    return out, report


def _to_relu(node: "onnx.NodeProto") -> None:
    """Turn a Clip(0, 6) node into a Relu on the same tensors (the paper's ReLU6 treatment)."""
    keep = node.input[0]
    del node.input[:]
    node.input.append(keep)
    del node.attribute[:]
    node.op_type = "Relu"
