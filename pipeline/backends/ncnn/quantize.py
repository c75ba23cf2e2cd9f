"""ncnn INT8 candidates from edgeship's one calibration: shared ranges, bias correction, int8 param/bin.

* Ranges: the calibration plan (``calibration.build_plan`` on the ONNX Runtime path's fit split,
  statistics cache and budget; symmetric activations, as ncnn's int8 is) gives one range per
  ONNX tensor. pnnx renames and fuses tensors, so ``calibration.transfer`` pairs each blob an
  int8 layer reads with the ONNX tensor holding the same values (fp32 ncnn and fp32 ONNX Runtime
  on a few fit samples). Paired blobs take the plan's range; a blob with no twin (only the fused
  ncnn graph has it) is observed on the fp32 ncnn model with the same observer and statistics
  binning. The report counts both.
* Bias correction: the same plan's corrected biases (correction.py).
* Method choice, fallback, budget and report: ``calibration.search`` over :class:`NcnnBuilder`
  (pipeline.backends.calibrate.run_search). Each candidate is a real ncnn int8 model scored on
  the calibration holdout against fp32 ncnn; ``ort-default`` (ONNX Runtime's own quantizer
  elsewhere) is plain min-max here. The fallback ranks layers by the SQNR that keeping each
  alone in float buys on the real ncnn model.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from calibration.search import Arrays, Holdout, Ranking, first
from calibration.sensitivity import LayerSensitivity
from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext
    from pipeline.backends.ncnn.paramfile import Layer, ParamFile

RANK_SAMPLES = 8  # holdout samples used to rank layer sensitivity (one ncnn run per layer each)
MATCH_SAMPLES = 2  # fit samples run through both fp32 models to pair blobs with ONNX tensors


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
    memo: dict[tuple[str, bool], Any] = field(default_factory=dict)
    """packed weights per layer (int8.write): every candidate of the search reuses them"""

    def write(self, layers: list["Layer"], thr: dict[str, float], folder: Path) -> dict[str, Any]:
        from pipeline.backends.ncnn import int8

        param, blob, report = int8.write(self.model, self.weights, layers, thr, per_channel=self.per_channel,
                                         biases=self.biases, memo=self.memo)
        folder.mkdir(parents=True, exist_ok=True)
        param.write(folder / self.config["param"])
        (folder / self.config["bin"]).write_bytes(blob)
        return report

    def run(self, layers: list["Layer"], thr: dict[str, float], x: np.ndarray) -> Arrays:
        """Every output (by the model's names) of the int8 model quantizing ``layers`` on ``x``."""
        from pipeline.backends.checks import run_runner_all

        self.write(layers, thr, self.folder)
        return run_runner_all("ncnn", self.folder, self.config, x, 1, self.threads)

    def score(self, layers: list["Layer"], thr: dict[str, float], x: np.ndarray, ref: Arrays) -> float:
        """The worst output's SQNR (dB) against the fp32 outputs ``ref``."""
        from calibration.metrics import sqnr_db

        out = self.run(layers, thr, x)
        return round(min(sqnr_db(r, out[k].reshape(r.shape)) for k, r in ref.items()), 3)


def _shared_ranges(ctx: "BuildContext", param_path: Path, bin_path: Path, input_blob: str, blobs: list[str],
                   fit: np.ndarray, methods: tuple[str, ...]
                   ) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, float]]:
    """Plan thresholds per method for the blobs that have an ONNX twin, the pairing report, and
    each paired blob's |x| max on the fit split (from the plan's statistics: no ncnn pass)."""
    from calibration.transfer import match_tensors, onnx_activations

    from pipeline.backends.calibrate import calibration_plans
    from pipeline.backends.ncnn import activations

    x = fit[:MATCH_SAMPLES]
    match = match_tensors(activations.extract(param_path, bin_path, input_blob, blobs, x, ctx.target.threads),
                          onnx_activations(ctx.onnx_fp32, x, threads=ctx.target.threads))
    plans, stats = calibration_plans(ctx, methods, "symmetric")
    pairs = {b: t for b, t in match.pairs.items() if t in stats.tensors}
    out = {m: {b: max(abs(plans[m].ranges[t][0]), abs(plans[m].ranges[t][1])) for b, t in pairs.items()}
           for m in methods}
    report = {"blobs": len(blobs), "from_plan": len(pairs), "observed_on_ncnn": [b for b in blobs if b not in pairs],
              "max_match_error": max(match.errors.values(), default=0.0), "pairs": match.pairs}
    return out, report, {b: stats.tensors[t].absmax for b, t in pairs.items()}


def _bias_correction(ctx: "BuildContext", model: "ParamFile", weights: dict[str, Any], scratch: Path
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Corrected biases per ncnn layer (from the ONNX Runtime path's plan) and the report entry.

    The bias-corrected ONNX model is converted with pnnx as well and compared with the plain
    conversion (correction.py). A conversion that differs anywhere but in biases is an error.
    """
    from pipeline.backends.ncnn import correction, paramfile, pnnx
    from pipeline.backends.ncnn.weights import read_weights

    work = scratch / "corrected"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corrected_fp32.onnx"
    corrected = correction.write_corrected_onnx(ctx, src)
    if not corrected:
        return {}, {"applied": False, "reason": "the calibration plan corrects no bias "
                    f"(method {ctx.spec.calibration.method!r})"}
    param_c, bin_c, _ = pnnx.run(ctx, work, fp16=False, onnx_path=src)
    model_c = paramfile.read(param_c)
    try:
        biases = correction.bias_overrides(model, weights, model_c, read_weights(model_c, bin_c.read_bytes()))
    except ValueError as err:
        raise ConversionError(f"ncnn int8: bias correction: {err}") from err
    return biases, {"applied": bool(biases), "onnx_biases_corrected": corrected, "ncnn_layers": len(biases),
                    "source": "calibration.build_plan + corrected_model (as quantize_onnx for ONNX Runtime)"}


@dataclass
class NcnnCandidate:
    """One ncnn int8 model: ``thr`` (one method's thresholds) on ``layers``, the rest float."""

    method: str
    float_layers: tuple[str, ...]
    trials: _Trials
    layers: list["Layer"]
    thr: dict[str, float]
    kept_float: list[dict[str, str]]
    facts: dict[str, Any]
    scales: dict[str, Any] | None = None

    def run(self, x: Arrays) -> Arrays:
        return self.trials.run(self.layers, self.thr, first(x))

    def write(self, workdir: Path) -> list[str]:
        self.scales = self.trials.write(self.layers, self.thr, workdir)
        return [self.trials.config["param"], self.trials.config["bin"]]

    def notes(self) -> dict[str, Any]:
        from pipeline.backends.ncnn import int8

        t = self.trials
        scales = self.scales if self.scales is not None else int8.write(
            t.model, t.weights, self.layers, self.thr, per_channel=t.per_channel, biases=t.biases, memo=t.memo)[2]
        float_names = {k["name"] for k in self.kept_float}
        float_ops = Counter(q.type for q in t.model.layers
                            if q.name not in scales and q.name not in float_names and q.type != "Input")
        return {**self.facts, "format": "ncnn int8 param/bin", "quantized_layers": len(scales),
                "kept_float": self.kept_float, "float_ops": dict(float_ops), "scales": scales}


@dataclass
class NcnnBuilder:
    """ncnn candidates: per-method thresholds (the shared plan's, paired by value) on the layers
    ncnn can run in int8; each candidate runs on the real ncnn."""

    trials: _Trials
    layers: list["Layer"]
    thresholds: dict[str, dict[str, float]]
    kept_float: list[dict[str, str]]
    facts: dict[str, Any]

    def candidate(self, method: str, float_layers: Sequence[str]) -> NcnnCandidate:
        keep = set(float_layers)
        kept = self.kept_float + [{"name": q.name, "type": q.type, "reason": "sensitivity fallback (calibration.fallback)"}
                                  for q in self.layers if q.name in keep]
        return NcnnCandidate(method, tuple(float_layers), self.trials, [q for q in self.layers if q.name not in keep],
                             self.thresholds[method], kept, self.facts)

    def rank(self, method: str, holdout: Holdout, reference: Arrays) -> Ranking:
        """Output SQNR that leaving each layer alone in float buys, on a few holdout samples (the
        solo SQNR is not measured on ncnn: ``saved_db`` ranks)."""
        t, thr, layers = self.trials, self.thresholds[method], self.layers
        xr, rr = first(holdout.x)[:RANK_SAMPLES], {k: v[:RANK_SAMPLES] for k, v in reference.items()}
        base = t.score(layers, thr, xr, rr)
        ranked = [LayerSensitivity(q.name, q.type, float("nan"), t.score([o for o in layers if o is not q], thr, xr, rr)
                                   - base, 0.0) for q in layers]
        return Ranking(sorted(ranked, key=lambda s: -s.saved_db))


def _int8_layers(layout: Any, absmax: dict[str, float]) -> tuple[list["Layer"], list[dict[str, str]]]:
    """The layers to quantize and those kept float with the reason (ncnn limits, user option,
    an input that is all zeros on real data: it has no scale, and float costs nothing)."""
    dead = [q for q in layout.quantize if absmax[q.bottoms[0]] == 0.0]
    kept = layout.kept_float + [{"name": q.name, "type": q.type, "reason": "input is zero on calibration data"}
                                for q in dead]
    return [q for q in layout.quantize if q not in dead], kept


def depthwise_policy(ctx: "BuildContext") -> str:
    """The build's int8_depthwise option; ``auto`` keeps the depthwise convs that ncnn's x86 int8
    kernel runs slower than fp32 float on an x86_64 target (int8.fast_int8_depthwise) and
    quantizes them all elsewhere (ncnn's ARM int8 kernels are its tuned ones; not measured here)."""
    option = str(ctx.build.options.get("int8_depthwise") or "auto")
    if option != "auto":
        return option
    return "x86" if ctx.target.arch == "x86_64" else "int8"


def ncnn_builder(ctx: "BuildContext", model: "ParamFile", param_path: Path, bin_path: Path, config: dict[str, Any],
                 scratch: Path, fit: Any, methods: tuple[str, ...]) -> NcnnBuilder:
    """Statistics on the fp32 ncnn model, the plan's ranges paired onto its blobs, the plan's
    bias correction: everything the candidates share, computed once."""
    from pipeline.backends.ncnn import activations, int8
    from pipeline.backends.ncnn.weights import read_weights

    try:
        weights = read_weights(model, bin_path.read_bytes())
    except ValueError as err:
        raise ConversionError(f"ncnn int8: cannot rewrite this model's weights: {err}") from err
    cal = ctx.spec.calibration
    layout = int8.plan(model, frozenset(ctx.build.options.get("float_layers") or ()), depthwise_policy(ctx))
    blobs = list(dict.fromkeys(q.bottoms[0] for q in layout.quantize))
    shared: dict[str, dict[str, float]] = {}
    absmax: dict[str, float] = {}
    sharing: dict[str, Any] = {"applied": False, "reason": "method 'ort-default' observes on ncnn itself"}
    if cal.method != "ort-default" and blobs:
        shared, sharing, absmax = _shared_ranges(ctx, param_path, bin_path, config["input"], blobs, fit.samples,
                                                 methods)
        sharing["applied"] = True
    # only the blobs with no ONNX twin need statistics of their own, on the fp32 ncnn model
    own = [b for b in blobs if b not in absmax]
    stats = activations.collect(param_path, bin_path, config["input"], config["output"], own, fit.samples,
                                threads=ctx.target.threads).stats if own else {}
    absmax.update({b: t.absmax for b, t in stats.items()})
    layers, kept = _int8_layers(layout, absmax)
    thresholds = {m: {**activations.thresholds(stats, m, cal.percentile), **shared.get(m, {})} for m in methods}
    biases, correction = _bias_correction(ctx, model, weights, scratch)
    trials = _Trials(model, weights, config, scratch / "trial", cal.per_channel, ctx.target.threads, biases)
    facts = {"shared_ranges": sharing, "bias_correction": correction,
             "weights": "per-channel" if cal.per_channel else "per-tensor",
             "activations": "symmetric int8 per tensor (ncnn)"}
    return NcnnBuilder(trials, layers, thresholds, kept, facts)


def build_int8(ctx: "BuildContext", model: "ParamFile", param_path: Path, bin_path: Path,
               config: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Write ``model.param`` / ``model.bin`` (int8) into ``ctx.workdir``; return the calibration report."""
    from pipeline.backends.calibrate import run_search, spec_methods, split
    from pipeline.backends.checks import run_runner_all

    if importlib.util.find_spec("calibration") is None:
        raise ConversionError("ncnn int8: edgeship's calibration package is not importable; install edgeship")
    t0 = time.perf_counter()
    fit, hold = split(ctx)
    methods = spec_methods(ctx, ort_default=("minmax",))  # ONNX Runtime's default calibrator is min-max
    builder = ncnn_builder(ctx, model, param_path, bin_path, config, scratch, fit, methods)
    fp32 = {**config, "param": param_path.name, "bin": bin_path.name, "int8": False}
    reference = run_runner_all("ncnn", bin_path.parent, fp32, hold.samples, 1, ctx.target.threads)
    found = run_search(ctx, builder, Holdout({config["input"]: hold.samples}, hold.labels), reference, methods,
                       len(fit), t0)
    found.candidate.write(ctx.workdir)
    found.report.notes = found.candidate.notes()
    return found.report.to_dict()
