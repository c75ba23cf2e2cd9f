"""The one calibration every backend's INT8 build starts from, and the one search it runs.

ONNX Runtime, TensorRT, ncnn and TFLite share the calibration set, the fit/holdout split, the
statistics cache, the accuracy budget, the observers, the metric and the search
(``calibration.search``): a backend brings only its candidate builder (see
``pipeline.backends.base``). This module maps the spec and the target onto those.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration.config import resolve_methods
from calibration.search import Arrays, CandidateBuilder, Holdout, Metric, SearchOptions, SearchResult, default_metric, search

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext


def budget_pp(ctx: "BuildContext") -> float:
    """The accuracy-drop budget of this build (the gate's: one rule for search and gate)."""
    from pipeline.validate.gate import budget_pp as gate_budget

    return float(gate_budget(ctx.spec, ctx.target))


def search_metric(ctx: "BuildContext") -> Metric:
    """What the INT8 search scores: the spec's metric (pipeline.metrics' registry, on postprocessed
    outputs), against the holdout's labels when the calibration set has them, else against the fp32
    outputs. A top1 or fidelity classifier keeps calibration.search's own Top1 / Agreement (the same
    numbers). Every backend's candidates return every output by name, so the metric reads any."""
    from pipeline.metrics import BUILTIN, spec_metric

    metric = spec_metric(ctx.spec)
    labelled = ctx.calibration.y is not None
    classifier = metric.name == "fidelity" and not metric.needs_labels or (
        metric is BUILTIN["top1"] and ctx.calibration.class_labels() is not None)
    if classifier or (not labelled and metric.name not in ("top5", "map")):
        return default_metric(ctx.calibration.class_labels() is not None, ctx.spec.evaluation.tie_margin)
    return SpecMetric(ctx, metric, _holdout_labels(ctx) if labelled else None)


def _holdout_labels(ctx: "BuildContext") -> Any:
    """The labels of the holdout :func:`split` gives, in its order (objects too: CalibrationSet
    keeps class indices only)."""
    _, hold = split(ctx)
    where = {sid: i for i, sid in enumerate(ctx.calibration.ids)}
    y = ctx.calibration.y
    picked = [where[sid] for sid in hold.ids]
    return y[picked] if isinstance(y, np.ndarray) else [y[i] for i in picked]


class SpecMetric:
    """``calibration.search.Metric`` over the registry's metric: candidate and fp32 outputs go
    through the spec's postprocess (batch by batch, as on the device) before they are scored."""

    def __init__(self, ctx: "BuildContext", metric: Any, labels: Any) -> None:
        from pipeline.metrics import spec_postprocess

        self.ctx, self.metric, self.labels = ctx, metric, labels
        self.name, self.higher_is_better = metric.name, metric.higher_is_better
        post = spec_postprocess(ctx.spec)
        self.post = post[0] if post else None

    def _outputs(self, outputs: Arrays) -> Arrays:
        from pipeline.metrics import postprocessed

        return postprocessed(self.ctx.spec, outputs, self.ctx.spec.input.shape[0], self.post)

    def score(self, outputs: Arrays, target: Any) -> float:
        got = self._outputs(outputs)
        n = len(next(iter(got.values())))
        if self.labels is not None:  # a backend may score whole batches only: a prefix of the holdout
            return self.metric.evaluate(got, self.labels[:n]).value
        reference = self._outputs(target)
        return self.metric.evaluate(got, _pseudo_labels(self.metric.name, reference), reference).value


PSEUDO_MIN_SCORE = 0.3
"""fp32 detections at least this confident stand for the ground truth of an unlabelled holdout."""


def _pseudo_labels(name: str, reference: Arrays) -> Any:
    """No labels: fp32's own answers are the truth (top5: its top-1 class; map: its confident boxes)."""
    if name == "top5":
        return np.asarray(next(iter(reference.values()))).argmax(axis=1)
    keep = reference["scores"] >= PSEUDO_MIN_SCORE
    return [{"boxes": reference["boxes"][i][keep[i]].tolist(), "classes": reference["classes"][i][keep[i]].tolist()}
            for i in range(len(keep))]


def spec_methods(ctx: "BuildContext", ort_default: tuple[str, ...]) -> tuple[str, ...]:
    """The methods the search tries: the spec's (``auto``: every observer); ``ort-default``
    (ONNX Runtime's own quantizer) means ``ort_default`` on a backend that has no such thing."""
    method = ctx.spec.calibration.method
    return ort_default if method == "ort-default" else resolve_methods(method)


def calibration_config(ctx: "BuildContext", method: str | None = None, activation_mode: str | None = None,
                       target: str = "onnxruntime") -> Any:
    """``calibration.CalibrationConfig`` for this build.

    Args:
        ctx: the build context (spec, target limits).
        method: override the spec's ``calibration.method`` (a backend that scores methods itself).
        activation_mode: override the spec's (ncnn, TFLite and TensorRT are symmetric int8).
        target: the calibration writer's rules ("onnxruntime" or "tensorrt").
    """
    from calibration import CalibrationConfig

    cal = ctx.spec.calibration
    return CalibrationConfig(method=method or cal.method, percentile=cal.percentile,
                             activation_mode=activation_mode or cal.activations, per_channel=cal.per_channel,
                             holdout_fraction=cal.holdout_fraction, max_drop_pp=budget_pp(ctx),
                             fallback=cal.fallback, target=target, tie_margin=ctx.spec.evaluation.tie_margin,
                             equalize=equalize_choice(cal.equalize), adaround=equalize_choice(cal.adaround),
                             min_sqnr_db=cal.floor_for(ctx.build.backend), close_islands=cal.close_islands)


def equalize_choice(value: bool | str) -> str:
    """``calibration.equalize`` or ``calibration.adaround`` of the spec (true | false | auto) as
    CalibrationConfig's word."""
    return {True: "on", False: "off"}.get(value, str(value))  # type: ignore[call-overload]


def calibration_set(ctx: "BuildContext") -> Any:
    """The build's calibration samples as a ``calibration.CalibrationSet`` (ids and labels kept)."""
    from calibration import CalibrationSet

    return CalibrationSet(ctx.calibration.single("INT8 calibration"), tuple(ctx.calibration.ids),
                          ctx.calibration.class_labels())


def split(ctx: "BuildContext") -> tuple[Any, Any]:
    """(fit, holdout) of the calibration set: the split every backend and the plan use."""
    cfg = calibration_config(ctx, "minmax")
    return calibration_set(ctx).split(cfg.holdout_fraction, cfg.seed)


def calibration_plan(ctx: "BuildContext", method: str, activation_mode: str = "symmetric") -> Any:
    """The calibration plan for ``method`` (see :func:`calibration_plans`)."""
    return calibration_plans(ctx, (method,), activation_mode)[0][method]


def calibration_plans(ctx: "BuildContext", methods: tuple[str, ...], activation_mode: str = "symmetric"
                      ) -> tuple[dict[str, Any], Any]:
    """The calibration plan per method and the statistics they come from, loaded once.

    The same fit split, prepared model and statistics cache as the ONNX Runtime path's
    ``quantize_onnx``: after the first build no model runs, and each plan is only arithmetic.
    """
    from calibration.api import qdq_builder

    if not methods:
        return {}, None
    cfg = calibration_config(ctx, "minmax", activation_mode)
    fit, _ = split(ctx)
    with tempfile.TemporaryDirectory(prefix="edgeship-plan-") as tmp:
        builder = qdq_builder(ctx.onnx_fp32, fit, cfg, ctx.cache_dir / "calibration", Path(tmp))
        return {m: builder.plan(m) for m in methods}, builder.stats


def run_search(ctx: "BuildContext", builder: CandidateBuilder, holdout: Holdout, reference: Arrays,
               methods: tuple[str, ...], fit_samples: int, started: float) -> SearchResult:
    """``calibration.search.search`` with this build's budget, fallback switch and metric.

    ``started`` (a ``time.perf_counter()``) dates the report's ``calibration_time_s`` from the
    start of the backend's INT8 work (statistics, pairing), not only the search.
    """
    options = SearchOptions(methods, budget_pp(ctx), bool(ctx.spec.calibration.fallback),
                            min_sqnr_db=ctx.spec.calibration.floor_for(ctx.build.backend))
    found = search(builder, holdout, reference, options, search_metric(ctx))
    found.report.calibration_samples = fit_samples
    found.report.calibration_time_s = round(time.perf_counter() - started, 3)
    return found
