"""``quantize_onnx``: calibrate once, pick the method on a holdout, fall back where needed.

Flow (every step after the statistics works from the cached statistics, never re-running the
calibration pass):

1. split the calibration set into fit / holdout (seeded); the evaluation set is never seen;
2. collect activation statistics on the fit part (cached by model, data and options);
3. for each candidate method, build the plan, write the real QDQ model and score it on the
   holdout against fp32 (output SQNR, top-1 agreement, accuracy with labels);
4. keep the best by holdout SQNR (continuous, so meaningful on a small holdout);
5. with a ``max_drop_pp`` budget that is not met, rank layers by sensitivity and keep the
   fewest most-sensitive layers in float that meet it, each candidate checked for real;
6. write the final model, verify its scales, and measure the per-tensor SQNR table.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from calibration.config import CalibrationConfig, CalibrationReport
from calibration.data import CalibrationSet
from calibration.errors import CalibrationError
from calibration.observers import METHODS
from calibration.plan import QuantPlan, make_plan


#: holdout samples used to rank layer sensitivity (the fallback itself is checked on all)
SENSITIVITY_SAMPLES = 16


def _prepare(model_fp32: Path, work: Path) -> tuple[Path, Any]:
    """Load the model; name unnamed nodes (fallback addresses nodes by name)."""
    import onnx

    from calibration.graph import ensure_node_names, load_model

    model = load_model(model_fp32)
    if ensure_node_names(model):
        path = work / "prepared.onnx"
        onnx.save(model, str(path))
        return path, model
    return Path(model_fp32), model


def _write(
    src: Path, model: Any, out: Path, plan: QuantPlan, cfg: CalibrationConfig, exclude: list[str]
) -> tuple[Path, list[str]]:
    """Write the QDQ model; return it and the tensors whose written scale is not the plan's."""
    import onnx

    from calibration.plan import corrected_model, float_tensors_for
    from calibration.writers.qdq import write_qdq

    qsrc = src
    if plan.bias:
        # bias correction lives in the float model that ORT quantizes; float layers keep theirs
        qsrc = out.with_name(out.stem + "_fp32_corrected.onnx")
        onnx.save(corrected_model(model, plan, exclude), str(qsrc))
    drop = float_tensors_for(model, exclude) if exclude else set()
    res = write_qdq(
        qsrc,
        out,
        plan.ranges,
        plan.acts,
        plan.weights,
        symmetric=plan.symmetric,
        per_channel=cfg.per_channel,
        nodes_to_exclude=exclude,
        quantize_bias=cfg.target != "tensorrt",
        float_tensors=drop,
    )
    return res.path, res.mismatches


def _score(path: Path, hold: CalibrationSet, ref: np.ndarray, cfg: CalibrationConfig) -> dict[str, float]:
    from calibration.metrics import fidelity
    from calibration.runtime import make_session, predict

    out = predict(make_session(path, threads=cfg.threads), hold.samples, cfg.batch_size)
    return {k: round(v, 4) for k, v in fidelity(ref, out, hold.labels, cfg.tie_margin).items()}


def quantize_onnx(
    model_fp32: Path,
    output: Path,
    calib: CalibrationSet,
    cfg: CalibrationConfig | None = None,
    cache_dir: Path | None = None,
) -> CalibrationReport:
    """Calibrate ``model_fp32`` on ``calib`` and write an INT8 QDQ model to ``output``.

    Args:
        model_fp32: fp32 ONNX model (BatchNorm folded for best results; the pipeline's optimize
            stage does it).
        output: where the QDQ model goes.
        calib: the calibration set (never the evaluation set).
        cfg: options; defaults to ``CalibrationConfig()`` (auto method, per-channel weights).
        cache_dir: statistics cache; None disables caching.

    Returns:
        The report: chosen method and why, per-method holdout scores, fallback layers, budget
        verdict, holdout metrics, per-tensor SQNR, ranges.

    Raises:
        CalibrationDataError: unusable calibration data.
        CalibrationError: the model cannot be calibrated or quantized.
    """
    from calibration.debug import per_layer_sqnr
    from calibration.graph import weighted_layers
    from calibration.runtime import make_session, predict
    from calibration.stats import collect_statistics

    cfg = cfg or CalibrationConfig()
    t0 = time.perf_counter()
    output = Path(output)
    fit, hold = calib.split(cfg.holdout_fraction, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="edgeship-calib-") as tmp_name:
        work = Path(tmp_name)
        src, model = _prepare(Path(model_fp32), work)
        stats = collect_statistics(src, fit, cache_dir, cfg.bins, cfg.batch_size, cfg.threads)
        layers = weighted_layers(model)
        ref = predict(make_session(src, threads=cfg.threads), hold.samples, cfg.batch_size)
        sym = cfg.symmetric

        methods = list(METHODS) if cfg.method == "auto" else [cfg.method]
        plans: dict[str, QuantPlan] = {}
        scores: dict[str, dict[str, float]] = {}
        mismatches: dict[str, list[str]] = {}
        for m in methods:
            plans[m] = make_plan(model, stats, layers, m, sym, cfg.per_channel, cfg.percentile, cfg.bias_correction)
            path, mismatches[m] = _write(src, model, work / f"{m}.onnx", plans[m], cfg, [])
            scores[m] = _score(path, hold, ref, cfg)
        best = max(methods, key=lambda m: (scores[m]["sqnr_db"], scores[m]["top1_agreement"]))
        if len(methods) > 1:
            others = ", ".join(f"{m} {scores[m]['sqnr_db']:.2f}" for m in methods if m != best)
            reason = (
                f"{best}: highest holdout output SQNR ({scores[best]['sqnr_db']:.2f} dB vs {others}) "
                f"on {len(hold)} held-out calibration samples; top-1 agreement "
                f"{scores[best]['top1_agreement']:.2f}%"
            )
        else:
            reason = f"{best}: requested explicitly"
        plan = plans[best]
        final = work / f"{best}.onnx"
        metrics = scores[best]

        report = CalibrationReport(
            method=best,
            method_scores=scores,
            reason=reason,
            activation_mode="symmetric" if sym else "asymmetric",
            per_channel=cfg.per_channel,
            target=cfg.target,
            stats_cache_hit=stats.cache_hit,
            scale_mismatches=mismatches[best],
            bias_corrected=sorted(plan.bias),
        )
        if cfg.max_drop_pp is not None:
            report.budget_met = metrics["drop_pp"] <= cfg.max_drop_pp
            if not report.budget_met and cfg.fallback:
                final, metrics = _fallback(src, model, work, plan, layers, hold, ref, cfg, metrics, report)
            elif not report.budget_met:
                from calibration.sensitivity import budget_reason

                report.budget_reason = budget_reason(metrics["drop_pp"], cfg.max_drop_pp, fallback=False)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final, output)
        if cfg.target == "tensorrt":
            from calibration.writers.tensorrt import check_tensorrt_rules

            check_tensorrt_rules(output)  # symmetric int8, zero point 0, output-axis channels
        report.holdout = metrics
        report.per_layer_sqnr = per_layer_sqnr(src, output, hold.samples, cfg.batch_size, cfg.threads)
        report.ranges = plan.ranges
        report.output = str(output)
    report.calibration_time_s = round(time.perf_counter() - t0, 3)
    return report


def _fallback(
    src: Path,
    model: Any,
    work: Path,
    plan: QuantPlan,
    layers: list,
    hold: CalibrationSet,
    ref: np.ndarray,
    cfg: CalibrationConfig,
    metrics: dict[str, float],
    report: CalibrationReport,
) -> tuple[Path, dict[str, float]]:
    """Run sensitivity + fallback; fill the report; return the final model and its metrics."""
    from calibration.sensitivity import choose_fallback, layer_sensitivity, only_layer_sqnr
    from calibration.simulate import build_gated_model

    if not layers:
        raise CalibrationError("the model has no quantizable weighted layers; nothing to fall back")
    gated = build_gated_model(model, layers, plan.acts, plan.weights, cfg.threads, plan.bias)
    # sensitivity ranks layers; a bounded subset of the holdout keeps it fast on big models
    k = min(len(hold), SENSITIVITY_SAMPLES)
    ranked = layer_sensitivity(gated, hold.samples[:k], ref[:k], None if hold.labels is None else hold.labels[:k],
                              tie_margin=cfg.tie_margin)
    paths: dict[tuple[str, ...], Path] = {}

    def evaluate(names: list[str]) -> dict[str, float]:
        path = work / f"fallback_{len(paths)}.onnx"
        _write(src, model, path, plan, cfg, names)  # mismatches: same plan, already reported
        paths[tuple(names)] = path
        return _score(path, hold, ref, cfg)

    budget = float(cfg.max_drop_pp if cfg.max_drop_pp is not None else 0.0)
    result = choose_fallback(ranked, evaluate, metrics, budget, cfg.max_fallback_layers)
    for layer in result.layers:
        layer.sqnr_db = round(only_layer_sqnr(gated, hold.samples[:k], ref[:k], layer.name), 3)
    report.fallback_layers = result.layers
    report.budget_met = result.budget_met
    report.budget_reason = result.reason
    if not result.budget_met and result.tried:
        report.budget_reason += "; tried " + ", ".join(f"{k} layer(s): {d:.2f} pp" for k, d in result.tried)
    # the shipped model is the last candidate checked, so the listed layers are the ones in it
    key = tuple(layer.name for layer in result.layers)
    if key in paths:
        return paths[key], result.metrics
    return work / f"{plan.method}.onnx", metrics


def build_plan(
    model_fp32: Path,
    calib: CalibrationSet,
    method: str,
    cfg: CalibrationConfig | None = None,
    cache_dir: Path | None = None,
) -> QuantPlan:
    """The quantization plan (ranges, activation and weight parameters) for one method.

    Uses the same fit split and statistics cache as :func:`quantize_onnx`, so after a
    ``quantize_onnx`` run this costs no model run; the TensorRT cache and ncnn table writers take
    the result, which keeps every backend on the same ranges as the QDQ model.

    Args:
        model_fp32: the fp32 ONNX model given to ``quantize_onnx``.
        calib: the same calibration set.
        method: the method ``quantize_onnx`` reported (``report.method``).
        cfg: the same config (split, activation mode, per-channel).
        cache_dir: the same statistics cache.
    """
    from calibration.graph import weighted_layers
    from calibration.stats import collect_statistics

    cfg = cfg or CalibrationConfig()
    fit, _ = calib.split(cfg.holdout_fraction, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="edgeship-plan-") as tmp:
        src, model = _prepare(Path(model_fp32), Path(tmp))  # as quantize_onnx: same model sha, same cache entry
        stats = collect_statistics(src, fit, cache_dir, cfg.bins, cfg.batch_size, cfg.threads)
    return make_plan(
        model, stats, weighted_layers(model), method, cfg.symmetric, cfg.per_channel, cfg.percentile, cfg.bias_correction
    )
