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


def _whole_batches(x: np.ndarray, batch: int) -> np.ndarray:
    """The first multiple of ``batch`` samples (the exported graph has a static batch)."""
    return x[:(x.shape[0] // batch) * batch]


def _run(module: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """(N, -1) float32 outputs of ``module`` on ``x`` in static batches (checks.run_batched)."""
    import torch

    from pipeline.backends.checks import run_batched

    with torch.no_grad():  # np.array: a writable copy (the samples may be memory-mapped)
        return run_batched(lambda chunk: module(torch.from_numpy(np.array(chunk))).numpy(), x, batch)


def _fallback_entry(f: Any) -> dict[str, Any]:
    """One fallback layer for the report: the module, the ONNX node it pairs with, what it saved."""
    if f.op.startswith("onnx "):
        return {"name": f.name, "onnx_node": f.op[5:], "saved_db": round(f.saved_db, 3), "saved_pp": round(f.saved_pp, 3)}
    return {"name": f.name, "solo_weight_sqnr_db": f.sqnr_db}


def convert_int8(p: Prepared, ctx: "BuildContext") -> tuple[bytes, dict[str, Any]]:
    """Full-integer INT8 from edgeship's one calibration (PT2E graph, litert-torch converter).

    * Weights: symmetric int8, per output channel unless the spec says ``per_channel: false``.
    * Activations: int8 per tensor. The observers see the calibration fit split; every observer
      whose tensor pairs with an ONNX tensor (ranges.py) then takes the shared calibration plan's
      range (asymmetric, as TFLite's int8 activations are). ``auto`` scores each method's ranges
      on the calibration holdout with the PT2E fake-quant graph (the arithmetic the TFLite model
      runs) and keeps the best. ``ort-default`` (or option ``observer: histogram``) keeps the
      graph's own observers. Conv + ReLU6 is fused (see quantizer.py).
    * Fallback (``calibration.fallback``): when the holdout drop exceeds the budget, Conv /
      Linear modules are ranked by what leaving each alone in float buys in the gated ONNX model
      under the same plan (the ranking ONNX Runtime's fallback uses, paired with the modules by
      value; sensitivity.py) and ``calibration.sensitivity.choose_fallback`` keeps the fewest in
      float that meet it, each candidate checked with the PT2E graph on the whole holdout.
      Modules named in ``options["float_layers"]`` always stay float.
    """
    import copy

    import litert_torch
    import torch
    from calibration.metrics import fidelity
    from calibration.graph import load_model
    from calibration.sensitivity import budget_reason, choose_fallback
    from calibration.transfer import onnx_activations
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from pipeline.backends.calibrate import budget_pp, calibration_config, calibration_plan, calibration_set
    from pipeline.backends.tflite import ranges as shared
    from pipeline.backends.tflite.quantizer import fold_zero_pads, make_quantizer
    from pipeline.backends.tflite.sensitivity import rank_modules

    cal = ctx.spec.calibration
    per_channel = bool(cal.per_channel)
    observer = str(ctx.build.options.get("observer", "minmax"))
    user_float = [str(n) for n in ctx.build.options.get("float_layers") or ()]
    cfg = calibration_config(ctx, "minmax", activation_mode="asymmetric")
    fit, hold = calibration_set(ctx).split(cfg.holdout_fraction, cfg.seed)
    fit_x = _whole_batches(to_model_layout(p, fit.samples), p.batch)
    hold_x = _whole_batches(to_model_layout(p, hold.samples), p.batch)
    labels = None if hold.labels is None else hold.labels[:hold_x.shape[0]]
    if fit_x.shape[0] == 0 or hold_x.shape[0] == 0:
        raise ValueError(f"calibration fit ({len(fit)}) and holdout ({len(hold)}) splits each need at least "
                         f"one batch of {p.batch} samples; add calibration samples")
    t0 = time.perf_counter()
    exported = torch.export.export(p.module, (p.sample,)).module()
    pads_folded = fold_zero_pads(exported)
    ref = _run(p.module, hold_x, p.batch)
    methods: tuple[str, ...] = ()
    if cal.method != "ort-default" and observer == "minmax":
        from calibration.observers import METHODS

        methods = tuple(METHODS) if cal.method == "auto" else (cal.method,)
    plans = {m: calibration_plan(ctx, m, activation_mode="asymmetric") for m in methods}
    onnx_values = onnx_activations(ctx.onnx_fp32, fit.samples[:p.batch], threads=ctx.target.threads) if plans else {}
    # bias correction barely depends on the method (only via the int32-bias floor): the first plan's
    corrected = next(iter(plans.values())).bias if plans else {}
    onnx_model = load_model(ctx.onnx_fp32) if corrected else None
    n_corrected = 0

    def prepared(float_layers: list[str]) -> tuple[Any, Any, shared.Pairing]:
        quantizer = make_quantizer(per_channel, observer, float_layers)
        graph = prepare_pt2e(copy.deepcopy(exported), quantizer)
        missing = sorted(set(float_layers) - set(quantizer.kept_float))
        if missing:  # checked before the (long) calibration pass
            raise ValueError(f"float_layers {missing} match no conv / linear module of the model")
        nonlocal n_corrected
        # pairing and bias correction both compare values with the *uncorrected* fp32 ONNX model
        pairing = shared.pair(graph, fit_x[:p.batch], onnx_values) if plans else shared.Pairing()
        if corrected:
            n_corrected = shared.correct_biases(graph, fit_x[:p.batch], onnx_values, onnx_model, corrected)
        _run(graph, fit_x, p.batch)  # the observers see every fit sample
        return quantizer, graph, pairing

    def finish(graph: Any, pairing: shared.Pairing, method: str | None) -> tuple[Any, int]:
        graph = copy.deepcopy(graph)
        applied = shared.apply(graph, pairing, plans[method].ranges) if method else 0
        return convert_pt2e(graph, fold_quantize=False), applied

    def score(q: Any) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in fidelity(ref, _run(q, hold_x, p.batch), labels, cfg.tie_margin).items()}

    quantizer, graph, pairing = prepared(user_float)
    scores = {m: score(finish(graph, pairing, m)[0]) for m in methods}
    method = max(methods, key=lambda m: (scores[m]["sqnr_db"], scores[m]["top1_agreement"])) if methods else None
    final, applied = finish(graph, pairing, method)
    holdout = scores[method] if method else score(final)
    budget = budget_pp(ctx)
    result = None
    if holdout["drop_pp"] > budget and cal.fallback:
        ranked = [s for s in rank_modules(ctx.torch_model().eval(), fit.samples, hold.samples, per_channel,
                                          ctx.onnx_fp32, plans.get(method), onnx_values, ctx.target.threads)
                  if s.name not in user_float]
        built: dict[tuple[str, ...], tuple[Any, Any, int]] = {}

        def evaluate(names: list[str]) -> dict[str, float]:
            qz, g, pr = prepared(user_float + names)
            q, n = finish(g, pr, method)
            built[tuple(names)] = (qz, q, n)
            return score(q)

        result = choose_fallback(ranked, evaluate, holdout, budget)
        key = tuple(f.name for f in result.layers)
        if key in built:
            quantizer, final, applied = built[key]
            holdout = result.metrics
    calib_s = time.perf_counter() - t0
    model = litert_torch.convert(final, (p.sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    budget_met = holdout["drop_pp"] <= budget
    info = {
        "quantizer": "litert_torch PT2E (symmetric int8 weights, int8 activations, static)",
        "method": method or f"{observer} (the graph's own observers)",
        "method_scores": scores,
        "reason": (f"{method}: highest holdout output SQNR ({scores[method]['sqnr_db']:.2f} dB) of the PT2E "
                   f"fake-quant graph on {hold_x.shape[0]} held-out calibration samples"
                   if len(methods) > 1 else f"{method or observer}: requested"),
        "shared_ranges": {"observers": len(pairing.pairs) + len(pairing.own), "from_plan": applied,
                          "observed_by_pt2e": pairing.own, "max_match_error": pairing.max_error},
        "weights": "per-channel" if per_channel else "per-tensor",
        "fused_conv_relu6": int(quantizer.fused_relu6),
        "pads_folded_into_conv": pads_folded,
        "kept_float": list(quantizer.kept_float),
        # a float layer reads a float tensor, so the conv / linear producing it stays float too
        "float_producers": sorted(set(quantizer.kept_float) - set(user_float)
                                  - {f.name for f in (result.layers if result is not None else [])}),
        "budget_pp": budget,
        "budget_met": budget_met,
        "budget_reason": budget_reason(holdout["drop_pp"], budget, cal.fallback, result),
        "holdout": holdout,
        "fallback_layers": [_fallback_entry(f) for f in (result.layers if result is not None else [])],
        "fallback_tried": [list(t) for t in result.tried] if result is not None else [],
        "bias_correction": {"applied": n_corrected > 0, "layers": n_corrected, "onnx_biases_corrected": len(corrected),
                            "source": "calibration plan (as quantize_onnx for ONNX Runtime), paired by value"},
        "calibration_samples": int(fit_x.shape[0]),
        "holdout_samples": int(hold_x.shape[0]),
        "calibration_sha256": ctx.calibration.sha256,
        "calibration_time_s": round(calib_s, 2),
    }
    return bytes(model.model_content()), info
