"""ncnn INT8 build: calibrate on the fp32 ncnn model, pick a range method, fall back, write.

* Method: the spec's ``calibration.method``; ``auto`` tries every observer of edgeship's
  calibration library (minmax, percentile, entropy, mse) and keeps the one whose int8 model is
  closest (output SQNR) to the fp32 ncnn model on calibration samples held out from the
  statistics (``calibration.holdout_fraction``). Only activation scales differ between
  candidates, so each costs one .bin write and a few inferences.
* Fallback (``calibration.fallback``): ncnn's int8 is symmetric, so a ReLU6 output in [0, 6]
  only gets 7 bits; on EfficientNet-Lite0 a couple of early layers dominate the error. When the
  held-out SQNR is below ``FALLBACK_TARGET_DB``, layers are ranked by how much SQNR keeping each
  alone in float buys, and kept float greedily (at most ``MAX_FALLBACK_FRACTION`` of them) until
  the target is met.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext
    from pipeline.backends.ncnn.paramfile import Layer, ParamFile

METHODS = ("minmax", "percentile", "entropy", "mse")
MIN_HOLDOUT = 8  # fewer held-out samples than this: select on the calibration samples themselves
FALLBACK_TARGET_DB = 18.0  # held-out SQNR a fallback aims for (the build check itself is in checks.py)
MAX_FALLBACK_FRACTION = 0.1  # never keep more than this share of the int8 layers in float
RANK_SAMPLES = 8  # samples used to rank layer sensitivity (one ncnn run per layer each)


def _methods(method: str) -> tuple[str, ...]:
    if method == "auto":
        return METHODS
    if method == "ort-default":
        return ("minmax",)  # ONNX Runtime's default calibrator is min-max
    return (method,)


def _split(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(statistics samples, held-out samples); without enough samples both are all of ``x``."""
    n_hold = int(round(x.shape[0] * fraction))
    if n_hold < MIN_HOLDOUT or x.shape[0] - n_hold < MIN_HOLDOUT:
        return x, x
    return x[:-n_hold], x[-n_hold:]


@dataclass
class _Trials:
    """Writes candidate int8 models into a scratch folder and scores them against fp32 ncnn."""

    model: "ParamFile"
    weights: dict[str, Any]
    config: dict[str, Any]
    folder: Path
    per_channel: bool
    threads: int
    biases: dict[str, np.ndarray]
    """ncnn layer name -> bias-corrected bias (applied to int8 layers only)"""

    def write(self, layers: list["Layer"], thr: dict[str, float], folder: Path) -> dict[str, Any]:
        from pipeline.backends.ncnn import int8

        param, blob, report = int8.write(self.model, self.weights, layers, thr, per_channel=self.per_channel,
                                         biases=self.biases)
        folder.mkdir(parents=True, exist_ok=True)
        param.write(folder / self.config["param"])
        (folder / self.config["bin"]).write_bytes(blob)
        return report

    def score(self, layers: list["Layer"], thr: dict[str, float], x: np.ndarray, ref: np.ndarray) -> float:
        """Output SQNR (dB) of the int8 model quantizing ``layers`` against the fp32 outputs ``ref``."""
        from pipeline.backends.checks import run_runner, sqnr_db

        self.write(layers, thr, self.folder)
        out = run_runner("ncnn", self.folder, self.config, x, 1, self.threads)
        return round(sqnr_db(ref.reshape(out.shape), out), 3)


def _fallback(trials: _Trials, layers: list["Layer"], thr: dict[str, float], x: np.ndarray, ref: np.ndarray,
              base: float) -> tuple[list["Layer"], dict[str, Any]]:
    """Greedy sensitivity fallback; returns (layers kept float, report)."""
    budget = max(1, int(len(layers) * MAX_FALLBACK_FRACTION))
    xr, rr = x[:RANK_SAMPLES], ref[:RANK_SAMPLES]
    base_r = trials.score(layers, thr, xr, rr)
    gains = {layer.name: trials.score([q for q in layers if q is not layer], thr, xr, rr) - base_r for layer in layers}
    order = sorted(layers, key=lambda q: gains[q.name], reverse=True)
    kept: list["Layer"] = []
    score = base
    for layer in order[:budget]:
        if score >= FALLBACK_TARGET_DB or gains[layer.name] <= 0.0:
            break
        kept.append(layer)
        score = trials.score([q for q in layers if q not in kept], thr, x, ref)
    report = {"target_sqnr_db": FALLBACK_TARGET_DB, "before_sqnr_db": base, "after_sqnr_db": score,
              "ranked_on_samples": int(xr.shape[0]),
              "top_gains_db": {q.name: round(gains[q.name], 3) for q in order[:max(budget, 3)]}}
    return kept, report


def _bias_correction(ctx: "BuildContext", model: "ParamFile", weights: dict[str, Any], scratch: Path
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Corrected biases per ncnn layer (from the ONNX Runtime path's plan) and the report entry.

    The bias-corrected ONNX model is converted with pnnx as well and compared with the plain
    conversion (correction.py). A conversion that differs anywhere but in biases is an error.
    """
    from pipeline.backends.ncnn import correction, paramfile
    from pipeline.backends.ncnn.convert import _run_pnnx
    from pipeline.backends.ncnn.weights import read_weights

    work = scratch / "corrected"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corrected_fp32.onnx"
    corrected = correction.write_corrected_onnx(ctx, src)
    if not corrected:
        return {}, {"applied": False, "reason": "the calibration plan corrects no bias "
                    f"(method {ctx.spec.calibration.method!r})"}
    param_c, bin_c, _ = _run_pnnx(ctx, work, fp16=False, onnx_path=src)
    model_c = paramfile.read(param_c)
    try:
        biases = correction.bias_overrides(model, weights, model_c, read_weights(model_c, bin_c.read_bytes()))
    except ValueError as err:
        raise ConversionError(f"ncnn int8: bias correction: {err}") from err
    return biases, {"applied": bool(biases), "onnx_biases_corrected": corrected, "ncnn_layers": len(biases),
                    "source": "calibration.build_plan + corrected_model (as quantize_onnx for ONNX Runtime)"}


def build_int8(ctx: "BuildContext", model: "ParamFile", param_path: Path, bin_path: Path,
               config: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Write ``model.param`` / ``model.bin`` (int8) into ``ctx.workdir``; return the int8 report."""
    from pipeline.backends.checks import run_runner
    from pipeline.backends.ncnn import activations, int8
    from pipeline.backends.ncnn.weights import read_weights

    if importlib.util.find_spec("calibration") is None:
        raise ConversionError("ncnn int8: edgeship's calibration package is not importable; install edgeship")
    try:
        weights = read_weights(model, bin_path.read_bytes())
    except ValueError as err:
        raise ConversionError(f"ncnn int8: cannot rewrite this model's weights: {err}") from err
    cal = ctx.spec.calibration
    layout = int8.plan(model, frozenset(ctx.build.options.get("float_layers") or ()))
    blobs = list(dict.fromkeys(layer.bottoms[0] for layer in layout.quantize))
    fit, hold = _split(np.asarray(ctx.calibration.x, np.float32), cal.holdout_fraction)
    stats = activations.collect(param_path, bin_path, config["input"], config["output"], blobs, fit,
                                threads=ctx.target.threads)
    dead = [layer for layer in layout.quantize if stats.stats[layer.bottoms[0]].absmax == 0.0]
    for layer in dead:  # an input that is all zeros on real data has no scale; float costs nothing
        layout.kept_float.append({"name": layer.name, "type": layer.type, "reason": "input is zero on calibration data"})
    layers = [layer for layer in layout.quantize if layer not in dead]

    fp32_hold = stats.outputs if hold is fit else run_runner(
        "ncnn", bin_path.parent, {**config, "param": param_path.name, "bin": bin_path.name, "int8": False},
        hold, 1, ctx.target.threads)
    biases, correction = _bias_correction(ctx, model, weights, scratch)
    trials = _Trials(model, weights, config, scratch / "trial", cal.per_channel, ctx.target.threads, biases)
    scores = {m: trials.score(layers, activations.thresholds(stats.stats, m, cal.percentile), hold, fp32_hold)
              for m in _methods(cal.method)}
    method = max(scores, key=lambda m: scores[m])
    thr = activations.thresholds(stats.stats, method, cal.percentile)
    fallback: dict[str, Any] = {"applied": False}
    if cal.fallback and scores[method] < FALLBACK_TARGET_DB:
        kept, fallback = _fallback(trials, layers, thr, hold, fp32_hold, scores[method])
        fallback["applied"] = bool(kept)
        for layer in kept:
            layout.kept_float.append({"name": layer.name, "type": layer.type,
                                      "reason": "sensitivity fallback (calibration.fallback)"})
        layers = [q for q in layers if q not in kept]
    report = trials.write(layers, thr, ctx.workdir)
    float_names = {k["name"] for k in layout.kept_float}
    float_ops = Counter(q.type for q in model.layers
                        if q.name not in report and q.name not in float_names and q.type != "Input")
    return {
        "method": method,
        "method_sqnr_db": scores,
        "selection": f"output SQNR vs fp32 ncnn on {hold.shape[0]} held-out calibration samples",
        "fallback": fallback,
        "bias_correction": correction,
        "calibration_samples": int(fit.shape[0]),
        "calibration_sha256": ctx.calibration.sha256,
        "weights": "per-channel" if cal.per_channel else "per-tensor",
        "activations": "symmetric int8 per tensor (ncnn)",
        "quantized_layers": len(report),
        "kept_float": layout.kept_float,
        "float_ops": dict(float_ops),
        "scales": report,
    }
