"""``quantize_onnx``: the QDQ candidate builder and the library entry point around the one search.

Flow (every step after the statistics works from the cached statistics, never re-running the
calibration pass):

1. split the calibration set into fit / holdout (seeded); the evaluation set is never seen;
2. collect activation statistics on the fit part (cached by model, data and options);
3. :func:`calibration.search.search` over :class:`QdqBuilder`: each method's plan is written as
   a real QDQ model and scored on the holdout against fp32 ONNX Runtime; the fallback ranks
   layers with the gated fake-quant model and checks each float set with the real QDQ model;
4. write the chosen model, verify its scales, and measure the per-tensor SQNR table.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from calibration.config import CalibrationConfig, resolve_methods, split_adaround, split_method
from calibration.data import CalibrationSet
from calibration.errors import CalibrationError
from calibration.islands import RuntimeCosts, close_islands, order_by_cost
from calibration.plan import QuantPlan, make_plan
from calibration.search import Arrays, Holdout, Metric, Ranking, SearchOptions, SearchReport, default_metric, first, search
from calibration.sensitivity import LayerSensitivity
from calibration.stats import Statistics

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


def run_onnx(path: Path | bytes, x: Arrays, cfg: CalibrationConfig) -> Arrays:
    """Every output of an ONNX model on ``x``, batched (``cfg.batch_size``, padded for a fixed batch)."""
    from calibration.runtime import make_session, run_batches

    session = make_session(path, threads=cfg.threads)
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for _, outs in run_batches(session, first(x), cfg.batch_size, names):
        for n, o in zip(names, outs):
            parts[n].append(o)
    return {n: np.concatenate(p).astype(np.float32, copy=False) for n, p in parts.items()}


@dataclass
class QdqCandidate:
    """A written QDQ model: the plan of ``method`` with ``float_layers`` left in float."""

    method: str
    float_layers: tuple[str, ...]
    path: Path
    plan: QuantPlan
    cfg: CalibrationConfig
    mismatches: list[str] = field(default_factory=list)

    def run(self, x: Arrays) -> Arrays:
        return run_onnx(self.path, x, self.cfg)

    def save(self, output: Path) -> None:
        """Copy the model to ``output``: for ONNX Runtime with narrow convs padded for its fused
        kernel (the same outputs), for TensorRT checked against its rules."""
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, output)
        if self.cfg.target == "onnxruntime":
            from calibration.writers.qdq import ORT_CHANNEL_ALIGN, pad_conv_channels

            pad_conv_channels(output, ORT_CHANNEL_ALIGN)
        if self.cfg.target == "tensorrt":
            from calibration.writers.tensorrt import check_tensorrt_rules

            check_tensorrt_rules(output)  # symmetric int8, zero point 0, output-axis channels

    def write(self, workdir: Path) -> list[str]:
        self.save(Path(workdir) / "model.onnx")
        return ["model.onnx"]

    def notes(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"format": "QDQ ONNX", "target": cfg.target, "per_channel": cfg.per_channel,
                "activation_mode": "symmetric" if self.plan.symmetric else "asymmetric",
                "scale_mismatches": self.mismatches, "bias_corrected": sorted(self.plan.bias),
                "adarounded": sorted(self.plan.rounded),
                "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in self.plan.ranges.items()}}


class QdqBuilder:
    """QDQ candidates (ONNX Runtime, TensorRT) from one set of statistics: a plan per method,
    computed once; each candidate is a real QDQ model written by ``writers.qdq``."""

    def __init__(self, src: Path, model: Any, stats: Statistics, cfg: CalibrationConfig, work: Path,
                 fit: CalibrationSet | None = None, cache_dir: Path | None = None) -> None:
        from calibration.graph import weighted_layers

        self.src, self.model, self.stats, self.cfg, self.work = src, model, stats, cfg, work
        self.fit, self.cache_dir = fit, cache_dir  # AdaRound's samples and its cache
        self.layers = weighted_layers(model)
        self.plans: dict[str, QuantPlan] = {}
        self.adaround: dict[str, dict[str, Any]] = {}  # "+ada" method -> calibration.adaround summary
        self.count = 0

    def plan(self, method: str) -> QuantPlan:
        """The plan of ``method``; "<observer>+ada" is the observer's with AdaRound's weights."""
        if method not in self.plans:
            c = self.cfg
            base, learned = split_adaround(method)
            plan = make_plan(self.model, self.stats, self.layers, base, c.symmetric, c.per_channel, c.percentile,
                             c.bias_correction)
            if learned:
                from calibration.adaround import learn_plan_rounding

                if self.fit is None:
                    raise CalibrationError(f"method {method!r} learns weight rounding: the builder has no fit samples")
                self.adaround[method] = learn_plan_rounding(self.model, plan, self.stats, self.fit, c.bias_correction,
                                                            self.cache_dir, c.batch_size, c.threads).summary()
            self.plans[method] = plan
        return self.plans[method]

    def candidate(self, method: str, float_layers: Sequence[str]) -> QdqCandidate:
        self.count += 1
        path = self.work / f"{method}_{self.count}.onnx"
        plan = self.plan(method)
        mismatches = write_qdq_model(self.src, self.model, path, plan, self.cfg, list(float_layers))
        return QdqCandidate(method, tuple(float_layers), path, plan, self.cfg, mismatches)

    def rank(self, method: str, holdout: Holdout, reference: Arrays) -> Ranking:
        """Leave-one-out on the gated fake-quant model (one session for every layer set)."""
        from calibration.sensitivity import layer_sensitivity, only_layer_sqnr
        from calibration.simulate import build_gated_model

        if not self.layers:
            raise CalibrationError("the model has no quantizable weighted layers; nothing to fall back")
        plan = self.plan(method)
        gated = build_gated_model(self.model, self.layers, plan.acts, plan.weights, self.cfg.threads, plan.bias)
        # a bounded subset of the holdout keeps the ranking fast on big models
        k = min(len(holdout), SENSITIVITY_SAMPLES)
        x, ref = first(holdout.x)[:k], first(reference)[:k]
        labels = None if holdout.labels is None else holdout.labels[:k]
        ranked = self.cost_order(layer_sensitivity(gated, x, ref, labels, tie_margin=self.cfg.tie_margin))
        return Ranking(ranked, solo_sqnr=lambda name: only_layer_sqnr(gated, x, ref, name), close=self.closer())

    def layout_costs(self) -> RuntimeCosts | None:
        """The runtime costs that shape the fallback (:mod:`calibration.islands`): ONNX Runtime's,
        whose int8 and float kernels use different layouts, unless ``close_islands`` is off;
        TensorRT fuses int8 and float layers in one layout, so its fallback is left as chosen."""
        if self.cfg.target != "onnxruntime" or not self.cfg.close_islands:
            return None
        from calibration.islands import ORT_CPU

        return ORT_CPU

    def cost_order(self, ranked: list[LayerSensitivity]) -> list[LayerSensitivity]:
        """The fallback's order by output noise removed per unit of estimated time
        (:func:`calibration.islands.order_by_cost`) where crossings have a cost: which layers go
        float decides how many the build pays."""
        costs = self.layout_costs()
        order = None if costs is None else order_by_cost(self.model, {s.name: s.saved_db for s in ranked}, costs)
        if order is None:
            return ranked
        by_name = {s.name: s for s in ranked}
        return [by_name[n] for n in order]

    def closer(self) -> Callable[[list[str]], list[str]] | None:
        """The island closing (:func:`calibration.islands.close_islands`) where crossings have a cost."""
        costs = self.layout_costs()
        return None if costs is None else (lambda names: close_islands(self.model, names, costs))


class EqualizeChoice:
    """Candidates on the plain graph and on its cross-layer-equalised twin (``calibration.equalize``),
    told apart by the method name: "entropy" is calibrated on the plain graph, "entropy+cle" on
    the equalised one; each graph has its own statistics (cached by its own sha256)."""

    def __init__(self, plain: QdqBuilder, equalized: QdqBuilder, facts: dict[str, Any]) -> None:
        self.plain, self.equalized, self.facts = plain, equalized, facts

    def builder(self, method: str) -> tuple[QdqBuilder, str]:
        """The builder that serves ``method`` and the observer's own name."""
        base, cle = split_method(method)
        return (self.equalized if cle else self.plain), base

    def candidate(self, method: str, float_layers: Sequence[str]) -> QdqCandidate:
        builder, base = self.builder(method)
        found = builder.candidate(base, float_layers)
        found.method = method  # the search keys candidates and the fallback by the full name
        return found

    def rank(self, method: str, holdout: Holdout, reference: Arrays) -> Ranking:
        builder, base = self.builder(method)
        return builder.rank(base, holdout, reference)


def equalized_builder(plain: QdqBuilder, fit: CalibrationSet, cfg: CalibrationConfig, cache_dir: Path | None,
                      work: Path) -> EqualizeChoice:
    """Equalise the plain builder's graph, collect its statistics, pair both in one builder."""
    import onnx

    from calibration.equalize import equalize
    from calibration.stats import collect_statistics

    t0 = time.perf_counter()
    model, eq = equalize(plain.model, cfg.equalize_relu6)  # type: ignore[arg-type]
    folder = work / "equalized"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "equalized_fp32.onnx"
    onnx.save(model, str(src))
    stats = collect_statistics(src, fit, cache_dir, cfg.bins, cfg.batch_size, cfg.threads)
    facts = {**eq.to_dict(), "relu6": cfg.equalize_relu6, "seconds": round(time.perf_counter() - t0, 3)}
    return EqualizeChoice(plain, QdqBuilder(src, model, stats, cfg, folder, fit, cache_dir), facts)


def write_qdq_model(src: Path, model: Any, out: Path, plan: QuantPlan, cfg: CalibrationConfig,
                    exclude: list[str]) -> list[str]:
    """Write the QDQ model; return the tensors whose written scale is not the plan's."""
    import onnx

    from calibration.plan import corrected_model, float_tensors_for
    from calibration.writers.qdq import write_qdq

    qsrc = src
    if plan.bias or plan.rounded:
        # bias correction and learned rounding live in the float model that ORT quantizes (with
        # the plan's scales it rounds s*q back to q); float layers keep their own
        qsrc = out.with_name(out.stem + "_fp32_corrected.onnx")
        onnx.save(corrected_model(model, plan, exclude), str(qsrc))
    drop = float_tensors_for(model, exclude) if exclude else set()
    ort = cfg.target != "tensorrt"  # TensorRT takes float biases and fuses int8-in/float-out layers
    res = write_qdq(qsrc, out, plan.ranges, plan.acts, plan.weights, symmetric=plan.symmetric,
                    per_channel=cfg.per_channel, nodes_to_exclude=exclude, quantize_bias=ort,
                    float_tensors=drop, ort_fusions=ort)
    return res.mismatches


def quantize_onnx(
    model_fp32: Path,
    output: Path,
    calib: CalibrationSet,
    cfg: CalibrationConfig | None = None,
    cache_dir: Path | None = None,
    metric: Metric | None = None,
) -> SearchReport:
    """Calibrate ``model_fp32`` on ``calib`` and write an INT8 QDQ model to ``output``.

    Args:
        model_fp32: fp32 ONNX model (BatchNorm folded for best results; the pipeline's optimize
            stage does it).
        output: where the QDQ model goes.
        calib: the calibration set (never the evaluation set).
        cfg: options; defaults to ``CalibrationConfig()`` (auto method, per-channel weights).
        cache_dir: statistics cache; None disables caching.
        metric: what the search scores and budgets (default: accuracy with labels, else top-1
            agreement with fp32 within ``cfg.tie_margin``).

    Returns:
        The search report; ``notes`` holds the QDQ facts (ranges, scale mismatches, corrected
        biases, activation mode).

    Raises:
        CalibrationDataError: unusable calibration data.
        CalibrationError: the model cannot be calibrated or quantized.
    """
    from calibration.debug import per_layer_sqnr

    cfg = cfg or CalibrationConfig()
    t0 = time.perf_counter()
    fit, hold = calib.split(cfg.holdout_fraction, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="edgeship-calib-") as tmp_name:
        plain = qdq_builder(Path(model_fp32), fit, cfg, cache_dir, Path(tmp_name))
        holdout = Holdout({"input": hold.samples}, hold.labels)
        # the reference is always the original graph: an equalised candidate that replaced a
        # ReLU6 is judged on what it changed
        reference = run_onnx(plain.src, holdout.x, cfg)
        choice = None if cfg.equalize == "off" else equalized_builder(plain, fit, cfg, cache_dir, Path(tmp_name))
        options = SearchOptions(resolve_methods(cfg.method, cfg.equalize, cfg.adaround), cfg.max_drop_pp, cfg.fallback,
                                cfg.max_fallback_layers, cfg.min_sqnr_db)
        found = search(choice or plain, holdout, reference, options,
                       metric or default_metric(hold.labels is not None, cfg.tie_margin))
        found.candidate.save(Path(output))
        report = found.report
        shipped = choice.builder(report.method)[0] if choice else plain
        report.notes = {**found.candidate.notes(), "output": str(output)}
        if choice:
            report.notes["equalization"] = {**choice.facts, "shipped": shipped is choice.equalized}
        base = choice.builder(report.method)[1] if choice else report.method
        if base in shipped.adaround:
            report.notes["adaround"] = shipped.adaround[base]
        # tensor by tensor against the graph it was calibrated on (equalisation rescales channels)
        # (the unpadded candidate: a padded conv input has no fp32 tensor of its shape)
        report.per_layer_sqnr = per_layer_sqnr(shipped.src, found.candidate.path, hold.samples, cfg.batch_size,
                                               cfg.threads)
    report.stats_cache_hit = plain.stats.cache_hit
    report.calibration_samples = len(fit)
    report.calibration_time_s = round(time.perf_counter() - t0, 3)
    return report


def qdq_builder(model_fp32: Path, fit: CalibrationSet, cfg: CalibrationConfig, cache_dir: Path | None,
                work: Path) -> QdqBuilder:
    """The QDQ builder on ``fit``'s statistics (collected once, cached by model and data)."""
    from calibration.stats import collect_statistics

    src, model = _prepare(model_fp32, work)
    stats = collect_statistics(src, fit, cache_dir, cfg.bins, cfg.batch_size, cfg.threads)
    return QdqBuilder(src, model, stats, cfg, work, fit, cache_dir)


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
    cfg = cfg or CalibrationConfig()
    fit, _ = calib.split(cfg.holdout_fraction, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="edgeship-plan-") as tmp:
        # as quantize_onnx: same prepared model, same model sha, same cache entry
        return qdq_builder(Path(model_fp32), fit, cfg, cache_dir, Path(tmp)).plan(method)
