"""ncnn INT8 build from edgeship's one calibration: shared ranges, method choice, budget fallback.

* Ranges: the calibration plan (``calibration.build_plan`` on the ONNX Runtime path's fit split,
  statistics cache and budget; symmetric activations, as ncnn's int8 is) gives one range per
  ONNX tensor. pnnx renames and fuses tensors, so ``calibration.transfer`` pairs each blob an
  int8 layer reads with the ONNX tensor holding the same values (fp32 ncnn and fp32 ONNX Runtime
  on a few fit samples). Paired blobs take the plan's range; a blob with no twin (only the fused
  ncnn graph has it) is observed on the fp32 ncnn model with the same observer and statistics
  binning. The report counts both.
* Method: the spec's ``calibration.method``; ``auto`` scores every observer's ranges with the real
  ncnn int8 model on the calibration holdout (output SQNR vs fp32 ncnn) and keeps the best.
  ``ort-default`` means ONNX Runtime's own quantizer elsewhere; here it is plain min-max.
* Bias correction: the same plan's corrected biases (correction.py).
* Fallback (``calibration.fallback``): when the holdout drop (accuracy with labels, else top-1
  disagreement with fp32 ncnn) exceeds the budget (spec ``accuracy.max_drop_pp``, tightened by
  the target), layers are ranked by the SQNR that keeping each alone in float buys, and
  ``calibration.sensitivity.choose_fallback`` keeps the fewest most sensitive ones in float that
  meet the budget, each candidate checked with the real ncnn model on the whole holdout. If no
  candidate does, ``budget_met`` is false and the gate fails the run.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext
    from pipeline.backends.ncnn.paramfile import Layer, ParamFile

METHODS = ("minmax", "percentile", "entropy", "mse")
RANK_SAMPLES = 8  # holdout samples used to rank layer sensitivity (one ncnn run per layer each)
MATCH_SAMPLES = 2  # fit samples run through both fp32 models to pair blobs with ONNX tensors


def _methods(method: str) -> tuple[str, ...]:
    if method == "auto":
        return METHODS
    if method == "ort-default":
        return ("minmax",)  # ONNX Runtime's default calibrator is min-max
    return (method,)


@dataclass
class _Trials:
    """Writes candidate int8 models into a scratch folder and runs them on the real ncnn."""

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

    def run(self, layers: list["Layer"], thr: dict[str, float], x: np.ndarray) -> np.ndarray:
        """Outputs of the int8 model quantizing ``layers`` on ``x``."""
        from pipeline.backends.checks import run_runner

        self.write(layers, thr, self.folder)
        return run_runner("ncnn", self.folder, self.config, x, 1, self.threads)

    def score(self, layers: list["Layer"], thr: dict[str, float], x: np.ndarray, ref: np.ndarray) -> float:
        """Output SQNR (dB) against the fp32 outputs ``ref``."""
        from calibration.metrics import sqnr_db

        out = self.run(layers, thr, x)
        return round(sqnr_db(ref.reshape(out.shape), out), 3)


def _shared_ranges(ctx: "BuildContext", param_path: Path, bin_path: Path, input_blob: str, blobs: list[str],
                   fit: np.ndarray, methods: tuple[str, ...]) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Plan thresholds per method for the blobs that have an ONNX twin, and the pairing report."""
    from calibration.transfer import match_tensors, onnx_activations

    from pipeline.backends.calibrate import calibration_plan
    from pipeline.backends.ncnn import activations

    x = fit[:MATCH_SAMPLES]
    match = match_tensors(activations.extract(param_path, bin_path, input_blob, blobs, x, ctx.target.threads),
                          onnx_activations(ctx.onnx_fp32, x, threads=ctx.target.threads))
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        ranges = calibration_plan(ctx, m, activation_mode="symmetric").ranges
        out[m] = {b: max(abs(ranges[t][0]), abs(ranges[t][1])) for b, t in match.pairs.items() if t in ranges}
    report = {"blobs": len(blobs), "from_plan": len(next(iter(out.values()), {})), "observed_on_ncnn": match.unmatched,
              "max_match_error": max(match.errors.values(), default=0.0), "pairs": match.pairs}
    return out, report


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


def _fallback(trials: _Trials, layers: list["Layer"], thr: dict[str, float], hold: Any, ref: np.ndarray,
              base: dict[str, float], budget: float, tie_margin: float) -> Any:
    """Rank layers on a few holdout samples, then ``choose_fallback`` on the whole holdout."""
    from calibration.metrics import fidelity
    from calibration.sensitivity import LayerSensitivity, choose_fallback

    xr, rr = hold.samples[:RANK_SAMPLES], ref[:RANK_SAMPLES]
    base_r = trials.score(layers, thr, xr, rr)
    ranked = [LayerSensitivity(q.name, q.type, float("nan"),
                               trials.score([o for o in layers if o is not q], thr, xr, rr) - base_r, 0.0)
              for q in layers]
    ranked.sort(key=lambda s: -s.saved_db)

    def evaluate(names: list[str]) -> dict[str, float]:
        keep = set(names)
        return fidelity(ref, trials.run([q for q in layers if q.name not in keep], thr, hold.samples), hold.labels,
                        tie_margin)

    return choose_fallback(ranked, evaluate, base, budget)


def build_int8(ctx: "BuildContext", model: "ParamFile", param_path: Path, bin_path: Path,
               config: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Write ``model.param`` / ``model.bin`` (int8) into ``ctx.workdir``; return the calibration report."""
    from calibration.metrics import fidelity
    from calibration.sensitivity import budget_reason

    from pipeline.backends.calibrate import budget_pp, calibration_config, calibration_set
    from pipeline.backends.checks import run_runner
    from pipeline.backends.ncnn import activations, int8
    from pipeline.backends.ncnn.weights import read_weights

    if importlib.util.find_spec("calibration") is None:
        raise ConversionError("ncnn int8: edgeship's calibration package is not importable; install edgeship")
    t0 = time.perf_counter()
    try:
        weights = read_weights(model, bin_path.read_bytes())
    except ValueError as err:
        raise ConversionError(f"ncnn int8: cannot rewrite this model's weights: {err}") from err
    cal = ctx.spec.calibration
    cfg = calibration_config(ctx, "minmax", activation_mode="symmetric")
    fit, hold = calibration_set(ctx).split(cfg.holdout_fraction, cfg.seed)
    layout = int8.plan(model, frozenset(ctx.build.options.get("float_layers") or ()))
    blobs = list(dict.fromkeys(layer.bottoms[0] for layer in layout.quantize))
    stats = activations.collect(param_path, bin_path, config["input"], config["output"], blobs, fit.samples,
                                threads=ctx.target.threads)
    dead = [layer for layer in layout.quantize if stats.stats[layer.bottoms[0]].absmax == 0.0]
    for layer in dead:  # an input that is all zeros on real data has no scale; float costs nothing
        layout.kept_float.append({"name": layer.name, "type": layer.type, "reason": "input is zero on calibration data"})
    layers = [layer for layer in layout.quantize if layer not in dead]

    methods = _methods(cal.method)
    shared: dict[str, dict[str, float]] = {}
    sharing: dict[str, Any] = {"applied": False, "reason": "method 'ort-default' observes on ncnn itself"}
    if cal.method != "ort-default" and blobs:
        shared, sharing = _shared_ranges(ctx, param_path, bin_path, config["input"], blobs, fit.samples, methods)
        sharing["applied"] = True

    def thresholds(m: str) -> dict[str, float]:
        return {**activations.thresholds(stats.stats, m, cal.percentile), **shared.get(m, {})}

    fp32_hold = run_runner("ncnn", bin_path.parent,
                           {**config, "param": param_path.name, "bin": bin_path.name, "int8": False},
                           hold.samples, 1, ctx.target.threads)
    biases, correction = _bias_correction(ctx, model, weights, scratch)
    trials = _Trials(model, weights, config, scratch / "trial", cal.per_channel, ctx.target.threads, biases)
    # one ncnn run per method over the holdout gives both its SQNR and its drop
    fids = {m: fidelity(fp32_hold, trials.run(layers, thresholds(m), hold.samples), hold.labels, cfg.tie_margin)
            for m in methods}
    scores = {m: round(f["sqnr_db"], 3) for m, f in fids.items()}
    method = max(scores, key=lambda m: scores[m])
    thr = thresholds(method)
    budget = budget_pp(ctx)
    holdout = fids[method]
    result = None
    if holdout["drop_pp"] > budget and cal.fallback and layers:
        result = _fallback(trials, layers, thr, hold, fp32_hold, holdout, budget, cfg.tie_margin)
        holdout = result.metrics
        kept = {f.name for f in result.layers}
        for layer in layers:
            if layer.name in kept:
                layout.kept_float.append({"name": layer.name, "type": layer.type,
                                          "reason": "sensitivity fallback (calibration.fallback)"})
        layers = [q for q in layers if q.name not in kept]
    budget_met = holdout["drop_pp"] <= budget
    report = trials.write(layers, thr, ctx.workdir)
    float_names = {k["name"] for k in layout.kept_float}
    float_ops = Counter(q.type for q in model.layers
                        if q.name not in report and q.name not in float_names and q.type != "Input")
    reason = (f"{method}: highest holdout output SQNR vs fp32 ncnn ({scores[method]:.2f} dB) on "
              f"{len(hold)} held-out calibration samples" if len(methods) > 1 else f"{method}: requested")
    return {
        "method": method,
        "method_sqnr_db": scores,
        "reason": reason,
        "budget_pp": budget,
        "budget_met": budget_met,
        "budget_reason": budget_reason(holdout["drop_pp"], budget, cal.fallback, result),
        "holdout": {k: round(float(v), 4) for k, v in holdout.items()},
        # sqnr_db (only that layer quantized) is not measured on ncnn: saved_db ranks the layers
        "fallback_layers": [{**asdict(f), "sqnr_db": None} for f in result.layers] if result is not None else [],
        "fallback_tried": [list(t) for t in result.tried] if result is not None else [],
        "shared_ranges": sharing,
        "bias_correction": correction,
        "calibration_samples": len(fit),
        "holdout_samples": len(hold),
        "calibration_sha256": ctx.calibration.sha256,
        "calibration_time_s": round(time.perf_counter() - t0, 3),
        "weights": "per-channel" if cal.per_channel else "per-tensor",
        "activations": "symmetric int8 per tensor (ncnn)",
        "quantized_layers": len(report),
        "kept_float": layout.kept_float,
        "float_ops": dict(float_ops),
        "scales": report,
    }
