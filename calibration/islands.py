"""Close the int8 islands a float fallback leaves where they cost more than they save.

The fallback keeps the layers that hurt fidelity most in float. On a runtime whose int8 and
float kernels use different layouts, every edge between an int8 and a float layer costs a
crossing: ONNX Runtime's CPU provider runs int8 convolutions in NHWC and float ones in NCHWc, so
each crossing is a Transpose, a (de)quantize and an NCHWc reorder of the whole tensor. A short
int8 run between two float layers then saves less than its two crossings cost: on MobileNetV2 a
single 24->144 1x1 conv at 56x56 between float layers saved 0.13 ms of compute and paid 0.25 ms
of crossings (ONNX Runtime's profiler, per node).

:func:`close_islands` estimates, per connected run of int8 layers, the compute that int8 saves
and the crossings it costs, with one runtime's measured relative costs (:class:`RuntimeCosts`),
and returns the fallback set with every run that loses time added. Keeping more layers in float
nearly always raises fidelity as well; not always, so the caller scores the real candidate on the
holdout and keeps it only if it still meets the budget and the floor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from calibration.graph import producer_map, tensor_dims, weighted_layers

if TYPE_CHECKING:
    import onnx

#: graph input / output as an endpoint: always float (the model's own float tensors)
EDGE = "<io>"


@dataclass(frozen=True)
class RuntimeCosts:
    """One runtime's relative kernel costs, in units of one fp32 1x1-conv multiply-accumulate.

    Attributes:
        depthwise_fp32: fp32 time per MAC of a depthwise conv (memory-bound, so dearer per MAC).
        int8_speedup: fp32 time / int8 time per layer kind ("conv", "depthwise", "stem": a conv
            reading <= 4 channels, an image's, which ONNX Runtime's int8 build pads to 4).
        crossing: time per element of a tensor that crosses between int8 and float.
    """

    depthwise_fp32: float
    int8_speedup: dict[str, float] = field(default_factory=dict)
    crossing: float = 0.0


#: ONNX Runtime 1.32, CPU provider, x86 AVX-512 VNNI, 2 threads, from per-node kernel times of
#: MobileNetV2 and EfficientNet-Lite0 (ONNX Runtime's profiler): fp32 1x1 conv ~14-18 ps per MAC,
#: depthwise ~3.6x that per MAC; int8 1x1 2.3-3.6x faster than fp32, depthwise 0.8-1.3x, the
#: 3-channel stem 0.76x as written by ONNX Runtime's quantizer and 1.3-1.5x (its Pad included)
#: padded to 4 channels (``writers.qdq.pad_conv_channels``). Crossing: closing MobileNetV2's two
#: losing runs removed 1.27 M crossing elements and 0.38 ms of Transpose, (de)quantize and
#: reorder kernels, ~0.3 ns per element: about 20 1x1-conv MACs.
#: Fitted on a Xeon before timing waited out ONNX Runtime's idle spinning (pipeline/agent/settle.py);
#: a settled profile on a Zen 4 EPYC (bench/results/ort-int8-profile.md) gives int8 1x1 2.9x and
#: depthwise 1.17x, inside the ranges above, so the table stands as a relative ordering.
ORT_CPU = RuntimeCosts(depthwise_fp32=3.6, int8_speedup={"conv": 2.8, "depthwise": 1.0, "stem": 1.3},
                       crossing=20.0)


@dataclass
class LayerCost:
    """A weighted layer's estimated fp32 time and int8 speed-up."""

    name: str
    fp32: float
    speedup: float


@dataclass
class CostGraph:
    """The weighted layers with their costs, and the tensors between them: (from, to, elements),
    ``EDGE`` standing for the graph's own inputs and outputs."""

    layers: dict[str, LayerCost]
    edges: list[tuple[str, str, int]]


def _elements(model: "onnx.ModelProto") -> dict[str, int]:
    """Tensor -> element count (tensors without a static shape left out)."""
    return {name: int(np.prod(dims)) for name, dims in tensor_dims(model).items() if dims and all(d > 0 for d in dims)}


def _kind(node: "onnx.NodeProto", dims: list[int]) -> str:
    """"depthwise" (one input channel per group), "stem" (a conv reading <= 4 channels) or "conv"."""
    if node.op_type != "Conv":
        return "conv"
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group > 1 and dims[1] == 1:
        return "depthwise"
    return "stem" if dims[1] * group <= 4 else "conv"


def cost_graph(model: "onnx.ModelProto", costs: RuntimeCosts) -> CostGraph | None:
    """The weighted layers' estimated fp32 times and int8 speed-ups, and the tensors between them.

    Returns None where a tensor a layer reads or writes has no static shape: no estimate is
    better than a wrong one.
    """
    elements = _elements(model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    layers: dict[str, LayerCost] = {}
    for layer in weighted_layers(model):
        dims = inits[layer.weight]
        if layer.output not in elements or not layer.inputs or layer.inputs[0] not in elements:
            return None
        kind = _kind(nodes[layer.node], dims)
        macs = elements[layer.output] * int(np.prod(dims)) // dims[layer.axis]
        per_mac = costs.depthwise_fp32 if kind == "depthwise" else 1.0
        layers[layer.node] = LayerCost(layer.node, macs * per_mac, costs.int8_speedup.get(kind, 1.0))
    edges = _edges(model, {name: nodes[name].input[0] for name in layers}, elements)
    fed = {a for a, _, _ in edges}
    edges += [(name, EDGE, elements[nodes[name].output[0]]) for name in layers if name not in fed]
    return CostGraph(layers, edges)


def _edges(model: "onnx.ModelProto", reads: dict[str, str], elements: dict[str, int]
           ) -> list[tuple[str, str, int]]:
    """(from, to, elements) per pair of weighted layers (or graph input) joined through unweighted
    nodes (ReLU, Add, pooling, reshapes): the tensor the later layer reads. ``reads``: weighted
    layer -> its activation input."""
    producer = producer_map(model.graph)
    inits = {i.name for i in model.graph.initializer}
    edges = []
    for name, x in reads.items():
        stack, seen, ups = [x], set(), set()
        while stack:
            t = stack.pop()
            if t in seen or t in inits:
                continue
            seen.add(t)
            p = producer.get(t)
            if p is None:
                ups.add(EDGE)
            elif p.name in reads:
                ups.add(p.name)
            else:
                stack.extend(i for i in p.input if i)
        edges += [(up, name, elements[x]) for up in sorted(ups)]
    return edges


def int8_runs(graph: CostGraph, floats: set[str]) -> list[set[str]]:
    """The connected runs of int8 layers (joined by the tensors between them)."""
    parent = {n: n for n in graph.layers if n not in floats}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b, _ in graph.edges:
        if a in parent and b in parent:
            parent[root(b)] = root(a)
    runs: dict[str, set[str]] = {}
    for n in parent:
        runs.setdefault(root(n), set()).add(n)
    return list(runs.values())


def run_balance(run: set[str], graph: CostGraph, costs: RuntimeCosts) -> tuple[float, float]:
    """(compute its int8 saves, time its crossings cost) of one maximal int8 run: every tensor
    between the run and the rest crosses, since whatever borders a maximal run is float."""
    saved = sum(graph.layers[n].fp32 * (1.0 - 1.0 / graph.layers[n].speedup) for n in run)
    crossed = sum(size for a, b, size in graph.edges if (a in run) != (b in run))
    return saved, crossed * costs.crossing


def close_islands(model: "onnx.ModelProto", float_layers: Iterable[str], costs: RuntimeCosts) -> list[str]:
    """``float_layers`` plus every int8 run whose crossings cost more than its int8 saves.

    Args:
        model: the fp32 graph the fallback names layers of (static shapes).
        float_layers: the fallback's float layers.
        costs: the target runtime's relative costs.

    Returns:
        The given layers, then the added ones in graph order; the input unchanged where nothing
        is in float or a shape is not static.
    """
    names = list(float_layers)
    graph = cost_graph(model, costs) if names else None
    if graph is None:
        return names
    added: set[str] = set()
    for run in int8_runs(graph, set(names)):
        saved, crossed = run_balance(run, graph, costs)
        if saved < crossed:
            added |= run
    return names + [n for n in graph.layers if n in added]


def _is_float(layer: str, floats: set[str]) -> bool:
    return layer == EDGE or layer in floats


def _crossed(edges: Iterable[tuple[str, str, int]], floats: set[str]) -> int:
    """Elements of the tensors in ``edges`` between an int8 and a float end."""
    return sum(size for a, b, size in edges if _is_float(a, floats) != _is_float(b, floats))


def estimated_time(graph: CostGraph, floats: set[str], costs: RuntimeCosts) -> float:
    """The model's estimated kernel time (1x1-conv MAC units) with ``floats`` float and the rest
    int8: each layer at its precision's cost, plus every tensor between the two precisions."""
    compute = sum(c.fp32 if n in floats else c.fp32 / c.speedup for n, c in graph.layers.items())
    return compute + _crossed(graph.edges, floats) * costs.crossing


def order_by_cost(model: "onnx.ModelProto", saved_db: dict[str, float], costs: RuntimeCosts) -> list[str] | None:
    """The layers in the order a float fallback should take them on a runtime with crossings:
    each next the one that removes the most output noise per unit of time it adds.

    ``saved_db`` (layer -> output SQNR recovered with that layer alone float, the leave-one-out
    ranking) gives each layer's share of the output noise, ``1 - 10**(-saved/10)``: the noise
    of single layers adds up close to independently (calibration/README.md). Time comes from
    :func:`estimated_time`, so a layer next to float ones (few new crossings) or a depthwise one
    (no int8 gain to lose) costs little, and one that removes crossings costs less than nothing
    and is taken first. Returns None without static shapes (the fidelity order stands).
    """
    graph = cost_graph(model, costs)
    if graph is None or set(saved_db) - set(graph.layers):
        return None
    noise = {n: max(0.0, 1.0 - 10.0 ** (-db / 10.0)) for n, db in saved_db.items()}
    # the time a layer adds is its own and its own tensors' (estimated_time's difference, without
    # summing the whole model for every candidate of every step)
    touching: dict[str, list[tuple[str, str, int]]] = {n: [] for n in graph.layers}
    for edge in graph.edges:
        for end in {edge[0], edge[1]} - {EDGE}:
            touching[end].append(edge)
    floats: set[str] = set()
    order: list[str] = []
    remaining = list(saved_db)  # fidelity order: the tie-break

    def merit(n: str) -> tuple[int, float]:
        c = graph.layers[n]
        crossed = _crossed(touching[n], floats | {n}) - _crossed(touching[n], floats)
        added = c.fp32 - c.fp32 / c.speedup + crossed * costs.crossing
        return (1, noise[n]) if added <= 0 else (0, noise[n] / added)

    while remaining:
        best = max(remaining, key=merit)
        remaining.remove(best)
        floats.add(best)
        order.append(best)
    return order
