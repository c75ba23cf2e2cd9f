"""Write an INT8 ncnn model from the fp32 one and edgeship's calibration.

No ncnn INT8 tools ship on the registries (no ncnn2table / ncnn2int8), so this module writes
what ncnn's int8 layers load (ncnn operators reference; Convolution / ConvolutionDepthWise /
InnerProduct ``load_model``):

* param: ``8=1`` (int8_scale_term) on each quantized layer;
* bin, per quantized layer: weight_data as tagged int8 (tag 0x000D4B38, padded to 4 bytes),
  bias (raw float32, unchanged), weight_data_int8_scales (raw float32, one per output channel,
  one per group for depthwise), bottom_blob_int8_scales (raw float32, one value).

ncnn's scales are multipliers: ``q = round(x * scale)``, i.e. ``127 / threshold`` -- the
reciprocal of the usual ``threshold / 127``. int8 layers dequantize to float before bias and
their fused activation, so every other layer keeps running in float.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.backends.ncnn.paramfile import Layer, ParamFile
from pipeline.backends.ncnn.weights import Buffer, buffer_specs, pack_float, pack_int8, pack_raw

QUANTIZABLE = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
INT8_MAX = 127


@dataclass
class Plan:
    """Which weighted layers get int8 and which stay float (with the reason)."""

    quantize: list[Layer]
    kept_float: list[dict[str, str]] = field(default_factory=list)


def plan(param: ParamFile, keep_float: set[str] | frozenset[str] = frozenset()) -> Plan:
    """Split the weighted layers of ``param`` into int8 candidates and float ones.

    Args:
        param: the fp32 model's param file.
        keep_float: layer names to keep float on purpose (user option or sensitivity fallback).
    """
    out = Plan([])
    for layer in param.layers:
        if not buffer_specs(layer) and layer.type not in QUANTIZABLE:
            continue  # weightless (pooling, eltwise, ...): runs in float on dequantized data
        if layer.type not in QUANTIZABLE:
            out.kept_float.append({"name": layer.name, "type": layer.type,
                                   "reason": f"ncnn has no int8 {layer.type}"})
        elif not buffer_specs(layer):
            out.kept_float.append({"name": layer.name, "type": layer.type,
                                   "reason": "dynamic weights (second input blob)"})
        elif layer.name in keep_float:
            out.kept_float.append({"name": layer.name, "type": layer.type, "reason": "kept float on request"})
        else:
            out.quantize.append(layer)
    return out


def _round_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, as ncnn's float2int8 (C ``round``)."""
    return np.trunc(x + np.copysign(0.5, x))


def weight_scales(layer: Layer, weight: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, ncnn weight scales) for one layer.

    Rows are output channels (Convolution, InnerProduct) or groups (ConvolutionDepthWise), as
    ncnn lays them out. Scales come from edgeship's calibration library (symmetric,
    absmax / 127 per row) and are inverted into ncnn's multipliers.
    """
    from calibration.observers import weight_qparams

    rows = layer.get_int(7, 1) if layer.type == "ConvolutionDepthWise" else layer.get_int(0)
    w = weight.reshape(rows, -1)
    scale = np.asarray(weight_qparams(w, axis=0, per_channel=per_channel).scale, np.float32)
    scale = np.broadcast_to(scale.reshape(-1), (rows,)).astype(np.float32)
    q = np.clip(_round_away(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(-1), (1.0 / scale).astype(np.float32)


def write(param: ParamFile, weights: dict[str, list[Buffer]], quantize: list[Layer],
          act_thresholds: dict[str, float], per_channel: bool = True,
          biases: dict[str, np.ndarray] | None = None,
          memo: dict[tuple[str, bool], Any] | None = None) -> tuple[ParamFile, bytes, dict[str, Any]]:
    """The int8 param file and bin bytes.

    Args:
        param: fp32 param file (not modified).
        weights: decoded fp32 buffers per layer (weights.read_weights).
        quantize: layers to quantize (plan().quantize).
        act_thresholds: bottom blob -> symmetric clipping threshold (activations.thresholds).
        per_channel: per-output-channel weight scales (else one per layer).
        biases: layer name -> bias to write instead of the fp32 one, for quantized layers only
            (bias correction, see correction.py); layers left float keep their own bias.
        memo: packed weights per (layer, quantized), kept between calls: a search writes dozens
            of candidates of one model, and a layer's packed weights never change.

    Returns:
        (param file, bin bytes, {layer name: {"bottom_scale", "threshold"}} for the report).
    """
    names = {layer.name for layer in quantize}
    memo = {} if memo is None else memo
    new_layers, chunks, report = [], [], {}
    for layer in param.layers:
        new = copy.deepcopy(layer)
        bufs = weights.get(layer.name, [])
        threshold = act_thresholds.get(layer.bottoms[0], 0.0) if layer.bottoms else 0.0
        if layer.name in names and threshold > 0.0:
            if (layer.name, True) not in memo:
                q, w_scales = weight_scales(layer, bufs[0].data, per_channel)
                memo[layer.name, True] = (pack_int8(q), w_scales)
            packed, w_scales = memo[layer.name, True]
            bottom_scale = np.float32(INT8_MAX / threshold)
            chunks.append(packed)
            fixed = (biases or {}).get(layer.name)
            # the bias, raw float32 as before (bias-corrected where given)
            chunks.extend(pack_raw(fixed if fixed is not None and b.label == "bias" else b.data) for b in bufs[1:])
            chunks.append(pack_raw(w_scales))
            chunks.append(pack_raw(np.array([bottom_scale], np.float32)))
            new.params[8] = "1"
            report[layer.name] = {"bottom": layer.bottoms[0], "threshold": float(threshold),
                                  "bottom_scale": float(bottom_scale), "bias_corrected": fixed is not None}
        else:
            if (layer.name, False) not in memo:
                memo[layer.name, False] = b"".join(pack_float(b) for b in bufs)
            chunks.append(memo[layer.name, False])
        new_layers.append(new)
    return ParamFile(new_layers), b"".join(chunks), report
