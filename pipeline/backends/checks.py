"""Post-conversion numeric checks, with every threshold in one place.

Every backend compares its artifact, run by the same runner class the device uses, with the
fp32 ONNX Runtime reference on real samples, and fails the build when the numbers break
(:func:`check_artifact`, the one entry point):

* fp32 and fp16: every output within a relative tolerance of fp32 on the check samples;
* int8: the check samples give every output, finite and shaped as fp32's; then the written
  artifact runs on the calibration holdout and is scored with the metric the INT8 search used
  (the spec's): it must reproduce the figure the search measured for the candidate it chose.
  That checks the converter (what was written is what was scored) in the units of the budget;
  whether the figure meets the budget is the search's report and the gate's business. An SQNR
  floor remains only where there is no task metric (``fidelity``) or no search figure
  (``ort-default``).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from calibration.metrics import sqnr_db, top1_agreement

from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext

# Max abs diff allowed, relative to the largest reference output magnitude.
FP32_REL_TOL = 1e-3
FP16_REL_TOL = 2e-2
# int8 without a task metric to check (fidelity, or no search: ort-default): signal fidelity.
INT8_MIN_SQNR_DB = 12.0
# int8: the written artifact's holdout figure may differ from the search candidate's by this
# share of the budget (a converter's rounding may differ from the candidate's, e.g. TFLite's
# integer kernels from the PT2E fake-quant graph) ...
INT8_METRIC_BUDGET_SHARE = 0.5
# ... or, for a metric that counts samples (top1, top5, agreement: 100/n points each), this many
# samples' worth on a small holdout.
INT8_METRIC_SAMPLES = 2


Arrays = dict[str, np.ndarray]


def compare(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """One output against its reference; ``top1_agreement`` only for scores shaped (N, classes)."""
    ref = reference.reshape(len(reference), -1)
    out = output.reshape(len(output), -1)
    scale = float(np.max(np.abs(ref))) or 1.0
    stats = {
        "max_abs_diff": float(np.max(np.abs(ref - out))),
        "rel_diff": float(np.max(np.abs(ref - out))) / scale,
        "sqnr_db": round(sqnr_db(ref, out), 3),
        "samples": int(len(ref)),
    }
    if _class_scores(reference):
        stats["top1_agreement"] = round(top1_agreement(ref, out), 3)
    return stats


def _class_scores(reference: np.ndarray) -> bool:
    """(N, classes) with more than one class: the outputs whose top-1 means something."""
    return reference.ndim == 2 and reference.shape[1] > 1


def _as_arrays(values: Arrays | np.ndarray) -> Arrays:
    return values if isinstance(values, dict) else {"output": values}


def worst(per_output: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The check's headline over every output: the largest differences, the lowest SQNR and
    agreement (the build holds every output to the thresholds, so the worst one decides)."""
    stats = list(per_output.values())
    out: dict[str, Any] = {"max_abs_diff": max(s["max_abs_diff"] for s in stats),
                           "rel_diff": max(s["rel_diff"] for s in stats),
                           "sqnr_db": min(s["sqnr_db"] for s in stats), "samples": stats[0]["samples"]}
    agreements = [s["top1_agreement"] for s in stats if "top1_agreement" in s]
    if agreements:
        out["top1_agreement"] = min(agreements)
    if len(per_output) > 1:
        out["outputs"] = per_output
    return out


def check_artifact(ctx: "BuildContext", backend: str, precision: str, run: Callable[[Arrays], Arrays],
                   calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numeric check of a written artifact (the module docstring says what each precision
    must pass): ``run`` is the artifact through its device runner (input name -> array in, every
    output out); ``calibration`` the INT8 search's report (``SearchReport.to_dict``). Returns
    ``{"check": ...}`` for the conversion report; raises ConversionError, one line."""
    figure = search_figure(calibration) if precision == "int8" else None
    floor = precision == "int8" and (figure is None or ctx.spec.evaluation.metric_name == "fidelity")
    out = check_outputs(backend, precision, ctx.reference, run(ctx.check.x), sqnr_floor=floor)
    if figure is not None:
        out["check"]["metric"] = check_metric(ctx, f"{backend} {precision}", run, calibration or {})
    return out


def search_figure(calibration: dict[str, Any] | None) -> float | None:
    """The INT8 search's holdout figure for the candidate it shipped (None: no search ran)."""
    if not calibration:
        return None
    value = (calibration.get("holdout") or {}).get(calibration.get("metric"))
    return None if value is None else float(value)


def check_metric(ctx: "BuildContext", what: str, run: Callable[[Arrays], Arrays],
                 calibration: dict[str, Any]) -> dict[str, Any]:
    """The written artifact on the holdout the search scored (its first ``n`` samples: a backend
    scoring whole batches used a prefix), with the search's metric against the same target:
    its figure must be the search's to within :func:`metric_tolerance`."""
    from calibration.search import Holdout, score

    from pipeline.backends.calibrate import search_metric, split

    metric, holdout = search_metric(ctx), calibration["holdout"]
    expected, n = float(holdout[calibration["metric"]]), int(holdout["n"])
    _, hold = split(ctx)
    x = {ctx.input_name: hold.samples[:n]}
    reference = fp32_reference(ctx, x)
    labels = None if hold.labels is None else hold.labels[:n]
    got = score(run(x), reference, Holdout(x, labels), metric)[metric.name]
    tol = metric_tolerance(metric, float(calibration.get("budget_pp") or 0.0), n)
    if abs(got - expected) > tol:
        raise ConversionError(
            f"{what}: the written model scores {metric.name} {got:.4g} on the {n} holdout samples where the INT8 "
            f"search's candidate scored {expected:.4g} (tolerance {tol:.3g}): the converter wrote another model than "
            "the one scored; ship fp32/fp16 of this backend meanwhile and report it with the build log")
    return {"name": metric.name, "value": round(got, 4), "search": round(expected, 4), "tolerance": round(tol, 4),
            "samples": n}


# The last fp32 reference computed: an INT8 build asks twice for the same holdout (the search,
# then the conversion check), seconds each on a large model.
_LAST_REFERENCE: dict[str, Arrays] = {}


def fp32_reference(ctx: "BuildContext", x: Arrays) -> Arrays:
    """Every output of the fp32 ONNX model (the one every backend converts) on ``x``, through
    the agent's ONNX Runtime runner: the reference INT8 figures are measured against."""
    digest = hashlib.sha256(str((str(ctx.onnx_fp32), ctx.onnx_fp32.stat().st_mtime_ns, ctx.output_names,
                                 ctx.spec.input.shape[0])).encode())
    for name in sorted(x):
        digest.update(name.encode() + str(x[name].shape).encode() + np.ascontiguousarray(x[name]).tobytes())
    key = digest.hexdigest()
    if key not in _LAST_REFERENCE:
        _LAST_REFERENCE.clear()
        _LAST_REFERENCE[key] = run_runner_all("onnxruntime", ctx.onnx_fp32.parent, {
            "model": ctx.onnx_fp32.name, "inputs": ctx.input_names, "outputs": ctx.output_names}, x,
            ctx.spec.input.shape[0], ctx.target.threads)
    return _LAST_REFERENCE[key]


def metric_tolerance(metric: Any, budget_pp: float, n: int) -> float:
    """How far the written artifact's holdout figure may be from the search candidate's: a share of
    the budget, or a few samples' worth for a metric that counts samples (:data:`INT8_METRIC_SAMPLES`)."""
    from pipeline.backends.calibrate import SpecMetric
    from pipeline.metrics import counts_samples

    per_sample = not isinstance(metric, SpecMetric) or counts_samples(metric.metric)
    return max(INT8_METRIC_BUDGET_SHARE * budget_pp, INT8_METRIC_SAMPLES * 100.0 / n if per_sample else 0.0)


def check_outputs(backend: str, precision: str, reference: Arrays | np.ndarray,
                  output: Arrays | np.ndarray, sqnr_floor: bool = True) -> dict[str, Any]:
    """Compare every output by name and raise ConversionError (one line naming the output) when a
    threshold is broken; arrays stand for a one-output model. ``sqnr_floor``: hold int8 outputs to
    :data:`INT8_MIN_SQNR_DB` (:func:`check_artifact` does where no metric figure checks them)."""
    reference, output = _as_arrays(reference), _as_arrays(output)
    if len(reference) == 1 and len(output) == 1:  # one output: whatever each side calls it
        output = {next(iter(reference)): next(iter(output.values()))}
    per_output = {}
    for name, ref in reference.items():
        if name not in output:
            raise ConversionError(f"{backend} {precision}: output {name!r} is missing (got {', '.join(output)})")
        per_output[name] = _check_one(f"{backend} {precision}" + (f" output {name!r}" if len(reference) > 1 else ""),
                                      precision, ref, output[name], sqnr_floor)
    return {"check": worst(per_output)}


def _check_one(what: str, precision: str, reference: np.ndarray, output: np.ndarray,
               sqnr_floor: bool) -> dict[str, float]:
    if output.shape[0] != reference.shape[0] or output.size != reference.size:
        raise ConversionError(f"{what}: output shape {output.shape} differs from the reference {reference.shape}")
    stats = compare(reference, output)
    if not np.all(np.isfinite(output)):
        raise ConversionError(f"{what}: outputs contain NaN or Inf")
    if precision in ("fp32", "fp16"):
        tol = FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL
        if stats["rel_diff"] > tol:
            raise ConversionError(f"{what}: max abs diff {stats['max_abs_diff']:.3g} is "
                                  f"{stats['rel_diff']:.2e} of the output scale, above the tolerance {tol:.0e}")
    elif sqnr_floor and stats["sqnr_db"] < INT8_MIN_SQNR_DB:
        raise ConversionError(f"{what}: SQNR {stats['sqnr_db']:.1f} dB vs fp32 is below {INT8_MIN_SQNR_DB} dB")
    return stats


def run_runner_all(runner_name: str, workdir: Any, config: dict[str, Any], x: Arrays | np.ndarray, batch: int,
                   threads: int = 2) -> Arrays:
    """Every output (name -> (N, ...)) of ``x`` (input name -> array; an array for one input)
    through the agent's runner class on the host (the code the device runs)."""
    from pipeline.agent.runners import load_runner_module

    runner = load_runner_module(runner_name).Runner(workdir, config, threads)
    runner.activate()
    try:
        if not isinstance(x, dict):
            x = {runner.inputs[0]: x}
        return run_batched_all(runner.run, x, batch)
    finally:
        runner.deactivate()


def run_runner(runner_name: str, workdir: Any, config: dict[str, Any], x: Arrays | np.ndarray, batch: int,
               threads: int = 2) -> np.ndarray:
    """The first output of :func:`run_runner_all`, (N, -1) float32 (a one-output model's outputs)."""
    out = next(iter(run_runner_all(runner_name, workdir, config, x, batch, threads).values()))
    return out.reshape(len(out), -1)


def run_batched_all(infer: Callable[[Arrays], Arrays], x: Arrays, batch: int) -> Arrays:
    """``infer`` (input name -> array in, output name -> array out) over ``x`` in chunks of a
    static ``batch``; the last chunk is padded with its last sample and the padding dropped from
    the outputs. Returns every output as (N, *per-sample shape) float32."""
    n = len(next(iter(x.values())))
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch):
        real = min(batch, n - i)
        feeds = {}
        for name, arr in x.items():
            chunk = arr[i:i + batch]
            if real < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
            feeds[name] = np.ascontiguousarray(chunk, dtype=np.float32)
        for name, out in infer(feeds).items():
            out = np.asarray(out, dtype=np.float32)
            outs.setdefault(name, []).append(out.reshape(batch, *out.shape[1:])[:real])
    return {name: np.concatenate(parts) for name, parts in outs.items()}


def run_batched(infer: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """:func:`run_batched_all` for a one-input, one-output ``infer`` (array in, array out). Returns (N, -1)."""
    out = run_batched_all(lambda feeds: {"y": infer(feeds["x"])}, {"x": x}, batch)["y"]
    return out.reshape(len(out), -1)
