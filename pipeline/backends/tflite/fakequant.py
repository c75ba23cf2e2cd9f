"""A faster copy of a converted PT2E graph for scoring INT8 candidates.

``convert_pt2e(fold_quantize=False)`` leaves every activation as a ``quantize_per_tensor`` ->
``dequantize_per_tensor`` pair of decomposed ops: multiply, round, add, clamp, cast to int8, cast
back, subtract, multiply, each a full pass over the tensor in Python-dispatched ATen calls. On
EfficientNet-Lite0 those pairs were ~80 % of the INT8 search's time on TFLite. ATen's
``fake_quantize_per_tensor_affine`` computes the same ``(clamp(round(x / s) + z) - z) * s`` in one
fused kernel. The search scores candidates with the fused copy; litert-torch still converts the
untouched graph, so what ships never sees this rewrite.
"""

from __future__ import annotations

import copy
from typing import Any


def _ops() -> tuple[Any, Any]:
    import torch
    from torch.ao.quantization.fx import _decomposed  # noqa: F401 - registers quantized_decomposed

    ns = torch.ops.quantized_decomposed
    return ns.quantize_per_tensor.default, ns.dequantize_per_tensor.default


def _fusable(dq: Any, q_op: Any, dq_op: Any) -> bool:
    """A dequantize whose input is a per-tensor quantize with the same parameters and no other
    reader of the int8 tensor (it then has nothing to feed once the pair is fused)."""
    if dq.op != "call_function" or dq.target is not dq_op or dq.kwargs:
        return False
    q = dq.args[0]
    return (getattr(q, "op", None) == "call_function" and q.target is q_op and len(q.users) == 1
            and tuple(q.args[1:]) == tuple(dq.args[1:]))


def fuse_fake_quant(graph_module: Any) -> tuple[Any, int]:
    """A copy of ``graph_module`` with each per-tensor quantize/dequantize pair replaced by one
    ``fake_quantize_per_tensor_affine``; returns (copy, pairs fused). The original is untouched."""
    import torch

    q_op, dq_op = _ops()
    gm = copy.deepcopy(graph_module)
    fused = 0
    for dq in list(gm.graph.nodes):
        if not _fusable(dq, q_op, dq_op):
            continue
        q = dq.args[0]
        x, scale, zero_point, qmin, qmax, _dtype = q.args
        with gm.graph.inserting_before(dq):
            fq = gm.graph.call_function(torch.fake_quantize_per_tensor_affine,
                                        (x, float(scale), int(zero_point), int(qmin), int(qmax)))
        fq.meta = dict(dq.meta)
        dq.replace_all_uses_with(fq)
        gm.graph.erase_node(dq)
        gm.graph.erase_node(q)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return gm, fused
