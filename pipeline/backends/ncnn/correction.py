"""Bias correction for ncnn INT8, from the same calibration plan the ONNX Runtime path uses.

``calibration.plan.corrected_model`` folds the mean output shift that int8 weight rounding
causes into each Conv/Gemm bias of the fp32 ONNX model. ncnn quantizes weights exactly as that
plan does (symmetric, absmax / 127 per output channel), so the correction carries over.

ONNX initializer names do not survive pnnx (layers are renamed and fused), so instead of mapping
names we convert the corrected ONNX model with pnnx a second time: the graph is identical except
for bias values, so both ncnn models must have the same layers and the same weight buffers, and
any bias buffer that differs is the corrected bias of that ncnn layer. Anything else (a layer,
a weight or a buffer layout that differs) is refused rather than guessed.

Activation statistics and the fp32 reference still come from the *plain* fp32 ncnn model:
the corrected fp32 model is not the model being approximated, only a carrier for int8 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext
    from pipeline.backends.ncnn.paramfile import ParamFile
    from pipeline.backends.ncnn.weights import Buffer

def write_corrected_onnx(ctx: "BuildContext", dst: Path) -> int:
    """Write the bias-corrected fp32 ONNX model to ``dst``.

    The plan is ``calibration.build_plan`` on the calibration set, config and statistics cache
    that ``quantize_onnx`` uses for ONNX Runtime, so both backends carry the same correction.

    Returns:
        How many bias initializers the plan corrected (0: ``dst`` is not written).
    """
    import onnx

    from calibration.config import resolve_methods
    from calibration.graph import load_model
    from calibration.plan import corrected_model

    from pipeline.backends.calibrate import calibration_config, calibration_plan

    method = ctx.spec.calibration.method
    if method == "ort-default":  # ONNX Runtime's own quantizer does no bias correction, so neither do we
        return 0
    method = resolve_methods(method)[0]  # auto: the first method's plan (bias barely depends on it)
    if not calibration_config(ctx, method).bias_correction:
        return 0
    plan = calibration_plan(ctx, method, activation_mode=ctx.spec.calibration.activations)
    if not plan.bias:
        return 0
    onnx.save(corrected_model(load_model(Path(ctx.onnx_fp32)), plan), str(dst))
    return len(plan.bias)


def bias_overrides(plain: "ParamFile", plain_w: dict[str, list["Buffer"]], corrected: "ParamFile",
                   corrected_w: dict[str, list["Buffer"]]) -> dict[str, np.ndarray]:
    """ncnn layer name -> corrected bias, by comparing two pnnx conversions buffer by buffer.

    Args:
        plain, plain_w: the fp32 ncnn model of the optimized ONNX and its decoded buffers.
        corrected, corrected_w: the same for the bias-corrected ONNX.

    Raises:
        ValueError: the two conversions differ anywhere but in bias values.
    """
    if len(plain.layers) != len(corrected.layers):
        raise ValueError(f"pnnx wrote {len(plain.layers)} layers for the model and {len(corrected.layers)} "
                         "for its bias-corrected copy")
    out: dict[str, np.ndarray] = {}
    for a, b in zip(plain.layers, corrected.layers):
        if (a.type, a.name, a.bottoms, a.tops, a.params) != (b.type, b.name, b.bottoms, b.tops, b.params):
            raise ValueError(f"layer {a.name!r} ({a.type}) differs from {b.name!r} ({b.type}) in the corrected model")
        bufs_a, bufs_b = plain_w.get(a.name, []), corrected_w.get(b.name, [])
        if [(x.label, x.data.shape) for x in bufs_a] != [(x.label, x.data.shape) for x in bufs_b]:
            raise ValueError(f"layer {a.name!r} has different weight buffers in the corrected model")
        for x, y in zip(bufs_a, bufs_b):
            if x.label == "bias" and a.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
                if not np.array_equal(x.data, y.data):
                    out[a.name] = y.data.astype(np.float32)
            elif not np.array_equal(x.data, y.data):
                raise ValueError(f"layer {a.name!r}: buffer {x.label!r} differs in the corrected model")
    return out
