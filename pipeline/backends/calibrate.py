"""The one calibration every backend's INT8 build starts from.

Each backend used to turn the spec into calibration options on its own; they all go through
here now, so ONNX Runtime, TensorRT, ncnn and TFLite share the calibration set, the fit/holdout
split, the statistics cache, the accuracy budget and the observers (calibration/ does the work;
this module only maps the spec and the target onto it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext


def budget_pp(ctx: "BuildContext") -> float:
    """The accuracy-drop budget: the spec's, tightened by the target's limit if it has one."""
    budget = ctx.spec.accuracy.max_drop_pp
    if ctx.target.limits.max_accuracy_drop_pp is not None:
        budget = min(budget, ctx.target.limits.max_accuracy_drop_pp)
    return float(budget)


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
                             fallback=cal.fallback, target=target, tie_margin=ctx.spec.evaluation.tie_margin)


def calibration_set(ctx: "BuildContext") -> Any:
    """The build's calibration samples as a ``calibration.CalibrationSet`` (ids and labels kept)."""
    from calibration import CalibrationSet

    return CalibrationSet(ctx.calibration.x, tuple(ctx.calibration.ids), ctx.calibration.y)


def calibration_plan(ctx: "BuildContext", method: str, activation_mode: str = "symmetric") -> Any:
    """The calibration plan for ``method`` (from the cached statistics: no model run after the first).

    Uses the same fit split and statistics cache as the ONNX Runtime path's ``quantize_onnx``.
    """
    from calibration import build_plan

    cfg = calibration_config(ctx, method, activation_mode)
    return build_plan(ctx.onnx_fp32, calibration_set(ctx), method, cfg, ctx.cache_dir / "calibration")
