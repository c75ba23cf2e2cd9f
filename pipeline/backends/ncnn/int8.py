"""Write an INT8 ncnn model from the fp32 one and edgeship's calibration.

No ncnn INT8 tools ship on the registries (no ncnn2table / ncnn2int8), so this module writes
what ncnn's int8 layers load (ncnn operators reference; Convolution / ConvolutionDepthWise /
InnerProduct ``load_model``):

* param: ``8=1`` (int8_scale_term) on each quantized layer;
* bin, per quantized layer: weight_data as tagged int8 (tag 0x000D4B38, padded to 4 bytes),
  bias (raw float32, unchanged), weight_data_int8_scales (raw float32, one per output channel,
  one per group for depthwise), bottom_blob_int8_scales (raw float32, one value);
* requantize, as ncnn's own ncnn2int8 does (``fuse_requantize``): a Convolution /
  ConvolutionDepthWise whose output only an int8 Convolution / ConvolutionDepthWise reads gets
  ``8=101`` and that reader's input scale as top_blob_int8_scales (raw float32, one value). It
  then writes int8 (bias, activation, then the reader's rounding) instead of float the reader
  quantizes again: the same numbers, a quarter of the bytes, one pass less. On the 2026-12-07
  x86 host this alone took MobileNetV2 and EfficientNet-Lite0 int8 from 0.96x fp32 to 1.11x /
  1.08x (batch 1, 2 threads; bench/ncnn_int8_x86.py, README "ncnn int8 on x86").

ncnn's scales are multipliers: ``q = round(x * scale)``, i.e. ``127 / threshold`` -- the
reciprocal of the usual ``threshold / 127``. Other int8 layers dequantize to float before bias
and their fused activation, so every other layer keeps running in float.
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


# int8_depthwise (the ncnn build option): "int8" quantizes every depthwise conv, "float" none, "x86"
# those that ncnn's x86 int8 kernel runs faster than its fp32 one (fast_int8_depthwise); "auto" is
# "x86" on x86_64 targets and "int8" elsewhere (quantize.depthwise_policy).
DEPTHWISE_POLICIES = ("int8", "float", "x86")


def fast_int8_depthwise(layer: Layer) -> bool:
    """Whether ncnn's x86 int8 kernel beats fp32 on this depthwise conv: only a 3x3 stride 2 one.

    ncnn's x86 int8 depthwise is one generic SSE loop (8 channels, 16-bit products, per output
    pixel; convolutiondepthwise_x86.cpp), several times the instructions per MAC of the fp32
    AVX/AVX-512 3x3 and 5x5 kernels. It pays only where the layer moves more data than it
    computes: a 3x3 stride 2 reads its int8 input (requantized by the conv before it) at a quarter
    of the bytes for 2.25 MACs per input value. Measured on the 2026-12-07 x86 host (batch 1, 2
    threads, requantize on, bench/ncnn_int8_x86.py): 3x3 stride 1 and 5x5 depthwise in float took
    MobileNetV2 int8 from 1.11x to 1.34x fp32 and EfficientNet-Lite0 from 1.08x to 1.38x; 3x3
    stride 2 in float as well gave 1.28x and 1.33x (README "ncnn int8 on x86").
    """
    kernel = (layer.get_int(1), layer.get_int(11, layer.get_int(1)))
    stride = (layer.get_int(3, 1), layer.get_int(13, layer.get_int(3, 1)))
    dilation = (layer.get_int(2, 1), layer.get_int(12, layer.get_int(2, 1)))
    return kernel == (3, 3) and stride == (2, 2) and dilation == (1, 1)


def _depthwise_reason(layer: Layer, depthwise: str) -> str | None:
    """Why ``layer`` stays float under the depthwise policy, or None to quantize it."""
    if layer.type != "ConvolutionDepthWise" or depthwise == "int8":
        return None
    if depthwise == "float":
        return "depthwise kept float (option int8_depthwise: float)"
    if layer.get_int(7, 1) != layer.get_int(0) or fast_int8_depthwise(layer):
        return None  # a grouped (not depthwise) conv, or one ncnn's x86 int8 kernel runs faster
    return "faster in float on x86: ncnn's x86 int8 depthwise kernel (int8_depthwise: auto)"


def plan(param: ParamFile, keep_float: set[str] | frozenset[str] = frozenset(), depthwise: str = "int8") -> Plan:
    """Split the weighted layers of ``param`` into int8 candidates and float ones.

    Args:
        param: the fp32 model's param file.
        keep_float: layer names to keep float on purpose (user option or sensitivity fallback).
        depthwise: one of DEPTHWISE_POLICIES: which ConvolutionDepthWise layers stay float for speed.
    """
    if depthwise not in DEPTHWISE_POLICIES:
        raise ValueError(f"depthwise policy {depthwise!r}: choose one of {DEPTHWISE_POLICIES}")
    out = Plan([])
    for layer in param.layers:
        if not buffer_specs(layer) and layer.type not in QUANTIZABLE:
            continue  # weightless (pooling, eltwise, ...): runs in float on dequantized data
        reason = None
        if layer.type not in QUANTIZABLE:
            reason = f"ncnn has no int8 {layer.type}"
        elif not buffer_specs(layer):
            reason = "dynamic weights (second input blob)"
        elif layer.name in keep_float:
            reason = "kept float on request"
        else:
            reason = _depthwise_reason(layer, depthwise)
        if reason is None:
            out.quantize.append(layer)
        else:
            out.kept_float.append({"name": layer.name, "type": layer.type, "reason": reason})
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
          memo: dict[tuple[str, bool], Any] | None = None,
          requantize: bool = True) -> tuple[ParamFile, bytes, dict[str, Any]]:
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
        requantize: int8 output for each int8 layer that only an int8 conv reads (see above).

    Returns:
        (param file, bin bytes, {layer name: {"bottom_scale", "threshold", "bias_corrected",
        "requantized_for" (the reader's name, requantized layers only)}} for the report).
    """
    names = {layer.name for layer in quantize
             if layer.bottoms and act_thresholds.get(layer.bottoms[0], 0.0) > 0.0}
    fused = requantize_pairs(param, names) if requantize else {}
    memo = {} if memo is None else memo
    new_layers, chunks, report = [], [], {}
    for layer in param.layers:
        new = copy.deepcopy(layer)
        bufs = weights.get(layer.name, [])
        threshold = act_thresholds.get(layer.bottoms[0], 0.0) if layer.bottoms else 0.0
        if layer.name in names:
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
            reader = fused.get(layer.name)
            if reader is not None:  # top_blob_int8_scales: the reader's own input scale
                chunks.append(pack_raw(np.array([INT8_MAX / act_thresholds[reader.bottoms[0]]], np.float32)))
                new.params[8] = "101"
            report[layer.name] = {"bottom": layer.bottoms[0], "threshold": float(threshold),
                                  "bottom_scale": float(bottom_scale), "bias_corrected": fixed is not None,
                                  **({"requantized_for": reader.name} if reader is not None else {})}
        else:
            if (layer.name, False) not in memo:
                memo[layer.name, False] = b"".join(pack_float(b) for b in bufs)
            chunks.append(memo[layer.name, False])
        new_layers.append(new)
    return ParamFile(new_layers), b"".join(chunks), report


REQUANTIZABLE = ("Convolution", "ConvolutionDepthWise")  # the layers ncnn's fuse_requantize pairs


def requantize_pairs(param: ParamFile, int8_names: set[str]) -> dict[str, Layer]:
    """int8 layer name -> the int8 layer that alone reads its output (both Convolution or
    ConvolutionDepthWise). A blob read by several layers goes through a Split in ncnn, and an int8
    blob must not reach a float layer: only a sole int8 reader qualifies."""
    readers: dict[str, list[Layer]] = {}
    for layer in param.layers:
        for b in layer.bottoms:
            readers.setdefault(b, []).append(layer)
    out = {}
    for layer in param.layers:
        if layer.name not in int8_names or layer.type not in REQUANTIZABLE or len(layer.tops) != 1:
            continue
        nxt = readers.get(layer.tops[0], [])
        if len(nxt) == 1 and nxt[0].name in int8_names and nxt[0].type in REQUANTIZABLE and len(nxt[0].bottoms) == 1:
            out[layer.name] = nxt[0]
    return out
