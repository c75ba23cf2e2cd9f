"""ncnn INT8 calibration table, in the format ncnn2table writes and ncnn2int8 reads.

One line per quantized layer's weights, then one per layer's input activation:

    <layer>_param_0 <s_0> <s_1> ... <s_{outch-1}>
    <layer> <s>

Scales are ncnn's multipliers: scale = 127 / absmax (the reciprocal of our float scale), weight
scales per output channel (per group for ConvolutionDepthWise), the activation scale from the
layer's *input* blob. Layers are Convolution / ConvolutionDepthWise / InnerProduct, i.e. our
Conv / Gemm / MatMul layers. ncnn layer names are the converter's (pnnx keeps ONNX node names
only in some cases), so callers pass ``layer_names`` mapping our node names to theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.errors import CalibrationError

if TYPE_CHECKING:
    from calibration.plan import QuantPlan


def write_ncnn_table(path: Path, plan: QuantPlan, layer_names: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """Write the table for every weighted layer of ``plan``.

    Args:
        path: output file (conventionally ``<model>.table``).
        plan: a :class:`calibration.plan.QuantPlan` (symmetric or not: ncnn is symmetric int8,
            so the activation amax = max(|lo|, |hi|) is used).
        layer_names: our node name -> ncnn layer name (default: identical).

    Returns:
        ncnn layer name -> (weight scales, activation scale) as written.
    """
    names = layer_names or {}
    written: dict[str, tuple[np.ndarray, float]] = {}
    wlines, alines = [], []
    for layer in plan.layers:
        ncnn_name = names.get(layer.node, layer.node)
        if any(ch.isspace() for ch in ncnn_name):
            raise CalibrationError(f"ncnn layer name {ncnn_name!r} contains whitespace; give a layer_names mapping")
        wq = plan.weights.get(layer.weight)
        rng = plan.ranges.get(layer.inputs[0]) if layer.inputs else None
        if wq is None or rng is None:
            continue
        # our weight scale is absmax/127, so ncnn's 127/absmax is its reciprocal
        w_scales = (1.0 / np.atleast_1d(wq.scale).astype(np.float64)).astype(np.float32)
        amax = max(abs(rng[0]), abs(rng[1]))
        a_scale = float(np.float32(127.0 / amax)) if amax > 0 else 1.0
        wlines.append(f"{ncnn_name}_param_0 " + " ".join(f"{s:f}" for s in w_scales) + " ")
        alines.append(f"{ncnn_name} {a_scale:f} ")
        written[ncnn_name] = (w_scales, a_scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(wlines + alines) + "\n")
    return written


def read_ncnn_table(path: Path) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Parse an ncnn table into (weight scales per layer, activation scale per layer).

    Lines starting with ``#`` are skipped: ncnn's docs use that to keep a layer in float.
    """
    weights: dict[str, np.ndarray] = {}
    acts: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0].endswith("_param_0"):
            weights[parts[0][: -len("_param_0")]] = np.array([float(v) for v in parts[1:]], np.float32)
        else:
            acts[parts[0]] = float(parts[1])
    return weights, acts
