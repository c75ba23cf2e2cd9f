"""calibration.islands on a small real ONNX graph with hand-checked costs.

The graph: X[1,8,16,16] -> A (1x1, 8->32) -> Relu -> B (3x3 depthwise, 32) -> C (1x1, 32->8)
-> Add(X) -> D (3x3, 8->64) -> Y. With A and C kept float, B is an int8 depthwise between float
layers: on ONNX Runtime it saves nothing (depthwise int8 runs at fp32's speed) and pays two
crossings of 8192 elements, so it is closed; D saves more than its crossings cost and stays int8.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.islands import (
    EDGE,
    ORT_CPU,
    close_islands,
    cost_graph,
    estimated_time,
    int8_runs,
    order_by_cost,
    run_balance,
)


def _conv(name: str, x: str, y: str, w: tuple[int, ...], group: int = 1) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    weight = numpy_helper.from_array(np.ones(w, np.float32), f"{name}_w")
    pad = w[-1] // 2
    node = helper.make_node("Conv", [x, weight.name], [y], name=name, group=group, pads=[pad] * 4)
    return node, weight


def graph(batch: int | str = 1) -> onnx.ModelProto:
    parts = [_conv("A", "X", "a", (32, 8, 1, 1)), _conv("B", "r", "b", (32, 1, 3, 3), group=32),
             _conv("C", "b", "c", (8, 32, 1, 1)), _conv("D", "s", "Y", (64, 8, 3, 3))]
    nodes = [parts[0][0], helper.make_node("Relu", ["a"], ["r"], name="relu"), parts[1][0], parts[2][0],
             helper.make_node("Add", ["c", "X"], ["s"], name="add"), parts[3][0]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 8, 16, 16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [w for _, w in parts])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_cost_graph_counts_macs_kinds_and_the_tensors_between_layers() -> None:
    g = cost_graph(graph(), ORT_CPU)
    assert g is not None and list(g.layers) == ["A", "B", "C", "D"]
    px = 16 * 16
    assert g.layers["A"].fp32 == px * 32 * 8 and g.layers["A"].speedup == 2.8
    assert g.layers["B"].fp32 == px * 32 * 9 * 3.6 and g.layers["B"].speedup == 1.0  # depthwise
    assert g.layers["D"].fp32 == px * 64 * 72
    # through the Relu and the residual Add; the input and the output are the graph's edges
    assert sorted(g.edges) == sorted([(EDGE, "A", 8 * px), ("A", "B", 32 * px), ("B", "C", 32 * px),
                                      (EDGE, "D", 8 * px), ("C", "D", 8 * px), ("D", EDGE, 64 * px)])


def test_a_depthwise_between_float_layers_is_closed_and_a_paying_run_is_not() -> None:
    model, px = graph(), 16 * 16
    g = cost_graph(model, ORT_CPU)
    assert g is not None
    runs = sorted(sorted(r) for r in int8_runs(g, {"A", "C"}))
    assert runs == [["B"], ["D"]]
    saved, crossed = run_balance({"B"}, g, ORT_CPU)
    assert saved == 0.0 and crossed == 2 * 32 * px * ORT_CPU.crossing
    saved, crossed = run_balance({"D"}, g, ORT_CPU)
    assert saved > crossed  # 1.18 M MACs at 2.8x vs 20 per element of 2 x 2048 in and 16384 out
    assert close_islands(model, ["C", "A"], ORT_CPU) == ["C", "A", "B"]
    # with only A float, B-C-D is one run reaching the output: it pays, nothing is added
    assert close_islands(model, ["A"], ORT_CPU) == ["A"]


def test_nothing_changes_without_a_float_layer_or_a_static_shape() -> None:
    assert close_islands(graph(), [], ORT_CPU) == []
    assert cost_graph(graph("N"), ORT_CPU) is None
    assert close_islands(graph("N"), ["A", "C"], ORT_CPU) == ["A", "C"]


def test_estimated_time_is_each_layer_at_its_precision_plus_the_crossings() -> None:
    g = cost_graph(graph(), ORT_CPU)
    assert g is not None
    fp32 = sum(c.fp32 for c in g.layers.values())
    # all float: fp32 itself, no crossing (the graph's input and output are float)
    assert estimated_time(g, set(g.layers), ORT_CPU) == fp32
    px, a = 16 * 16, g.layers["A"]
    # only A int8: A at 2.8x, its input and its output cross
    only_a = fp32 - a.fp32 + a.fp32 / 2.8 + (8 + 32) * px * ORT_CPU.crossing
    assert np.isclose(estimated_time(g, {"B", "C", "D"}, ORT_CPU), only_a)


def test_the_cost_order_takes_the_cheap_float_layer_first_and_the_noisy_one_regardless() -> None:
    """Equal noise, so the order is by added time. From all int8: A loses its 2.8x but frees the
    input's crossing for one of 32 channels (+165 k); B alone would add two 32-channel crossings
    (+328 k); C +247 k; D, the most arithmetic, +431 k. Once A is float, B next to it moves a
    crossing instead of adding one (+0), and then C removes one (< 0): the float region grows
    where it is cheap. A layer that carries most of the noise is taken first all the same."""
    model = graph()
    g = cost_graph(model, ORT_CPU)
    assert g is not None
    added = {n: estimated_time(g, {n}, ORT_CPU) - estimated_time(g, set(), ORT_CPU) for n in "ABCD"}
    assert sorted(added, key=added.get) == ["A", "C", "B", "D"]
    assert estimated_time(g, {"A", "B"}, ORT_CPU) == estimated_time(g, {"A"}, ORT_CPU)
    assert estimated_time(g, {"A", "B", "C"}, ORT_CPU) < estimated_time(g, {"A", "B"}, ORT_CPU)
    even = {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}
    assert order_by_cost(model, even, ORT_CPU) == ["A", "B", "C", "D"]
    # the fidelity order's first layer is not what decides: C first in the ranking, A still first
    assert order_by_cost(model, {"C": 1.0, "B": 1.0, "A": 1.0, "D": 1.0}, ORT_CPU)[0] == "A"
    assert order_by_cost(model, {**even, "D": 12.0}, ORT_CPU)[0] == "D"
    assert order_by_cost(graph("N"), even, ORT_CPU) is None
