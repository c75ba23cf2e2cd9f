"""Stage: fold Conv+BatchNormalization, infer shapes, simplify (onnxslim).

Folding: BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta applied to y = W*x + b is
W' = W * s[:, None, None, None], b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps).
The exporter's own optimizer often folds BN already; this pass catches what it leaves (models
from other sources, training-mode exports) and reports how many it folded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration.graph import drop_unused_initializers
from pipeline.errors import ConversionError

# Optimizing only refolds arithmetic: outputs stay within this share of each output's scale.
OPTIMIZE_ATOL = 1e-4


def fold_conv_bn(model: Any) -> int:
    """Fold every BatchNormalization that directly follows a Conv with no other consumer. In place.

    Returns the number of BatchNormalization nodes removed.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    removed = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0], 0) != 1:
            continue
        if conv.output[0] in graph_outputs or not all(n in inits for n in bn.input[1:5]):
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        s = gamma / np.sqrt(var + eps)
        w_new = (w * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b_new = ((b - mean) * s + beta).astype(np.float32)
        w_name, b_name = conv.input[1] + "_bnfold", conv.output[0] + "_bias_bnfold"
        graph.initializer.append(numpy_helper.from_array(w_new, w_name))
        graph.initializer.append(numpy_helper.from_array(b_new, b_name))
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    if removed:
        drop_unused_initializers(graph)
        onnx.checker.check_model(model)
    return len(removed)


def count_ops(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def optimize_onnx(src: Path, out: Path, check_x: dict[str, np.ndarray] | np.ndarray, batch: int) -> dict[str, Any]:
    """fold Conv+BN -> onnxslim (constant folding, dead code, shape inference) -> every output checked
    against the exported model on ``check_x`` (input name -> samples; an array for one input)."""
    import onnx
    import onnxslim

    from pipeline.stages.export import compare_outputs, run_onnx

    model = onnx.load(str(src))
    before = count_ops(model)
    folded = fold_conv_bn(model)
    slim = onnxslim.slim(model)
    slim = onnx.shape_inference.infer_shapes(slim, strict_mode=False)
    onnx.checker.check_model(slim)
    onnx.save(slim, str(out))
    after = count_ops(slim)
    ref = run_onnx(src, check_x, batch)
    got = run_onnx(out, check_x, batch)
    if list(got) != list(ref):  # the names the spec, the runners and the metric use must survive
        raise ConversionError(f"optimizing renamed the model's outputs {list(ref)} to {list(got)}")
    ok, worst, diff = compare_outputs(ref, got, 0.0, OPTIMIZE_ATOL)
    if not ok:
        raise ConversionError(f"optimized ONNX drifted from the exported one: output {worst!r} max abs diff {diff:.3g}")
    # A BN that follows something other than a Conv stays; the report counts it, not hides it.
    return {"bn_folded": folded, "bn_left": after.get("BatchNormalization", 0), "ops_before": before, "ops_after": after,
            "optimize_check_max_abs_diff": diff, "onnxslim": onnxslim.__version__}
