"""litert-torch conversions: fp32, fp16 weights, full-integer INT8 (PT2E, real calibration samples).

Heavy imports (torch, litert_torch, torchao, ai_edge_quantizer) happen inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext

# Ops whose weights ai-edge-quantizer's float_casting can store as fp16 (DEQUANTIZE in front).
_FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")


@dataclass
class Prepared:
    """The PyTorch module as it will be converted, and the sample it is traced with."""

    module: Any
    sample: Any
    """torch.Tensor in the model's input layout, batch = the spec's static batch."""
    batch: int
    data_layout: str
    model_layout: str
    notes: dict[str, Any] = field(default_factory=dict)


def prepare(ctx: "BuildContext") -> Prepared:
    """Load the eval-mode module; wrap it for channels-last I/O if ``channels_last_io`` is set.

    The samples the agent hands in keep the spec's layout (``ctx.spec.input.layout``); if the
    model's input layout differs the runner transposes, and runner_config records both.
    """
    import torch

    module = ctx.torch_model().eval()
    batch = int(ctx.spec.input.shape[0])
    data_layout = ctx.spec.input.layout
    x = np.ascontiguousarray(ctx.calibration.x[:batch], dtype=np.float32)
    if x.shape[0] != batch:
        raise ValueError(f"need at least {batch} calibration samples to trace the model, got {x.shape[0]}")
    model_layout = data_layout
    if ctx.build.options.get("channels_last_io") and data_layout == "NCHW":
        import litert_torch

        # NHWC input avoids the leading TRANSPOSE litert-torch otherwise inserts for NCHW models
        module = litert_torch.to_channel_last_io(module, args=[0])
        x = x.transpose(0, 2, 3, 1).copy()
        model_layout = "NHWC"
    return Prepared(module, torch.from_numpy(x), batch, data_layout, model_layout)


def to_model_layout(p: Prepared, x: np.ndarray) -> np.ndarray:
    """Samples in the data layout -> the layout the converted module takes."""
    if p.data_layout == p.model_layout:
        return x
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def convert_fp32(p: Prepared) -> bytes:
    """Plain float32 conversion."""
    import litert_torch

    return bytes(litert_torch.convert(p.module, (p.sample,)).model_content())


def cast_weights_fp16(fp32_model: bytes) -> tuple[bytes, dict[str, Any]]:
    """Store the weights of conv / fully-connected ops as fp16 (activations stay float32).

    Uses ai-edge-quantizer's ``float_casting`` (TFLite's "float16 quantization"): half the size,
    and XNNPACK may run the graph in fp16 where the CPU supports it.
    """
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qz = quantizer.Quantizer(bytearray(fp32_model))
    for op in _FP16_WEIGHT_OPS:
        qz.add_weight_only_config(".*", getattr(qtyping.TFLOperationName, op), 16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
    result = qz.quantize(enable_progress_report=False)
    return bytes(result.quantized_model), {"method": "ai_edge_quantizer float_casting", "ops": list(_FP16_WEIGHT_OPS)}


def convert_int8(p: Prepared, ctx: "BuildContext") -> tuple[bytes, dict[str, Any]]:
    """Full-integer INT8: PT2E quantizer, calibrated on every sample of ``ctx.calibration.x``.

    Weights: symmetric int8, per output channel unless the spec says ``per_channel: false``.
    Activations: int8 per tensor; observer from ``options["observer"]`` (``minmax`` default,
    ``histogram`` for L2-optimal clipping at ~10x the calibration time). Conv + ReLU6 is fused
    (see quantizer.py): litert-torch's stock quantizer would not, and loses the model.
    Layers named in ``options["float_layers"]`` and, with ``calibration.fallback``, the layers
    sensitivity.py picks stay float (mixed model: DEQUANTIZE -> float op -> QUANTIZE).
    """
    import litert_torch
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from pipeline.backends.tflite.quantizer import make_quantizer

    per_channel = bool(ctx.spec.calibration.per_channel)
    observer = str(ctx.build.options.get("observer", "minmax"))
    float_layers = [str(n) for n in ctx.build.options.get("float_layers") or ()]
    fallback: dict[str, Any] = {"applied": False}
    if ctx.spec.calibration.fallback:
        from pipeline.backends.tflite.sensitivity import choose_float_layers

        chosen, fallback = choose_float_layers(ctx.torch_model().eval(), np.asarray(ctx.calibration.x), per_channel)
        fallback["applied"] = bool(chosen)
        float_layers += [n for n in chosen if n not in float_layers]
    quantizer = make_quantizer(per_channel, observer, float_layers)
    t0 = time.perf_counter()
    graph = torch.export.export(p.module, (p.sample,)).module()
    graph = prepare_pt2e(graph, quantizer)
    missing = sorted(set(float_layers) - set(quantizer.kept_float))
    if missing:  # checked before the (long) calibration pass
        raise ValueError(f"float_layers {missing} match no conv / linear module of the model")
    calib = to_model_layout(p, np.asarray(ctx.calibration.x, dtype=np.float32))
    usable = (calib.shape[0] // p.batch) * p.batch  # the exported graph has a static batch
    with torch.no_grad():
        for i in range(0, usable, p.batch):
            graph(torch.from_numpy(np.ascontiguousarray(calib[i:i + p.batch])))
    calib_s = time.perf_counter() - t0
    graph = convert_pt2e(graph, fold_quantize=False)
    model = litert_torch.convert(graph, (p.sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    info = {
        "quantizer": "litert_torch PT2E (symmetric int8, static)",
        "weights": "per-channel" if per_channel else "per-tensor",
        "activation_observer": observer,
        "fused_conv_relu6": int(quantizer.fused_relu6),
        "kept_float": list(quantizer.kept_float),
        "fallback": fallback,
        "calibration_samples": int(usable),
        "calibration_sha256": ctx.calibration.sha256,
        "calibration_seconds": round(calib_s, 2),
    }
    return bytes(model.model_content()), info
