"""The one metric registry: what the host computes from a run's raw outputs and the labels.

Every metric takes ``outputs`` (output name -> array over all evaluation samples, after
``evaluation.postprocess``), the labels (kept on the host) and the fp32 reference's outputs, and
returns a :class:`Score`: the primary ``value`` in the units its budget is written in, plus extra
figures that are reported beside it. Built in (shared/decisions.md, "Metrics"):

* ``top1``, ``top5``: percent of samples whose label is the first / among the first five classes of
  the first output, which must be shaped (N, classes); labels are class indices.
* ``fidelity``: per output, SQNR (dB) against fp32; for outputs shaped (N, classes) also top-1
  agreement (%). The value is the worst agreement (the gate holds the worst output).
* ``map``: COCO mAP@[.5:.95] x 100 through pycocotools, mAP@.5 and mAP@.75 as extras; reads the
  ``boxes``, ``scores``, ``classes`` outputs and per-sample ``{"boxes", "classes"}`` labels.

A user metric (``{callable: "module:function", name, higher_is_better}``) gets ``(outputs,
labels)`` and returns a float or a dict with ``value`` plus extras. The budget is in the metric's
points; for a lower-is-better metric the drop is the increase (:func:`drop_pp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from pipeline.errors import EdgeshipError, InputFileError, SpecError, UserCodeError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.spec import PipelineSpec

Arrays = dict[str, np.ndarray]
DETECTION_OUTPUTS = ("boxes", "scores", "classes")


@dataclass
class Score:
    """A metric's primary value (budget units) and the extra figures reported with it."""

    value: float
    extras: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One entry of the registry. ``float16_ok``: the device may send outputs as float16."""

    name: str
    higher_is_better: bool
    compute: Callable[[Arrays, Any, "Arrays | None"], Score]
    float16_ok: bool = False
    needs_labels: bool = True

    def evaluate(self, outputs: Arrays, labels: Any, reference: Arrays | None = None) -> Score:
        """The metric of ``outputs``; bad labels or outputs are one line (exit 2), user code that
        raises or answers wrongly one line naming it (exit 1)."""
        if self.needs_labels and labels is None:
            raise SpecError(f"metric {self.name} needs labels; the evaluation set has none: return (x, labels) "
                            "from the source, or use metric: fidelity")
        return self.compute(outputs, labels, reference)

    def score(self, outputs: Arrays, target: Any) -> float:
        """``calibration.search.Metric``: the value against labels (or the fp32 outputs for fidelity)."""
        if self.needs_labels:
            return self.evaluate(outputs, target).value
        return self.evaluate(outputs, None, target).value


class Directed(Protocol):
    """Anything that says which way its metric is better (a :class:`Metric`, the search's)."""

    @property
    def higher_is_better(self) -> bool: ...


def drop_pp(metric: Directed | bool, reference: float, value: float) -> float:
    """The drop the budget is held to, in the metric's points: the decrease of a higher-is-better
    metric, the increase of a lower-is-better one. ``metric`` is the metric, or its
    ``higher_is_better`` where only that was kept (results.json's ``reference``). The one rule:
    the INT8 search, the device rows, the gate, the nightly and the baseline all call it."""
    higher = metric if isinstance(metric, bool) else metric.higher_is_better
    return round((reference - value) if higher else (value - reference), 4)


def class_scores(outputs: Arrays, metric: str) -> tuple[str, np.ndarray]:
    """The first output, which top-k metrics read; it must be shaped (N, classes)."""
    name, arr = next(iter(outputs.items()))
    if arr.ndim != 2:
        raise SpecError(f"metric {metric} reads class scores shaped (N, classes) from the model's first output "
                        f"{name!r}, which is shaped {('N', *arr.shape[1:])}; use metric: fidelity, map, or your own "
                        "(metric: {callable: module:function, name: ..., higher_is_better: ...})")
    return name, arr


def class_labels(labels: Any, n: int, classes: int, metric: str, ids: list[str] | None = None) -> np.ndarray:
    """Labels as class indices 0..classes-1, one per sample (else one line: exit 2); ``ids``
    names a bad sample as its source does."""
    arr = labels if isinstance(labels, np.ndarray) else None
    if arr is None or arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        what = f"{type(labels).__name__}" if arr is None else f"{arr.dtype} {arr.shape}"
        raise InputFileError(f"metric {metric} reads {n} integer class indices as labels, got {what}; return an "
                             "int array of labels from the evaluation source, or name a metric that reads these")
    bad = np.flatnonzero((arr < 0) | (arr >= classes))
    if bad.size:
        i = int(bad[0])
        raise InputFileError(f"metric {metric}: label {int(arr[i])} of sample {ids[i] if ids else i!r} is outside the "
                             f"model's {classes} classes ({bad.size} of {n} labels are); labels are class indices "
                             f"0..{classes - 1}: fix the labels or the model")
    return arr


def top_k_hits(outputs: Arrays, labels: Any, k: int) -> np.ndarray:
    """Per sample: is the label among the first ``k`` classes of the first output? (The paired
    interval pairs these with fp32's.)"""
    metric = f"top{k}"
    _, scores = class_scores(outputs, metric)
    y = class_labels(labels, len(scores), scores.shape[1], metric)
    if k == 1:  # argmax, exactly as the device's fast path (ties: the first class)
        return scores.argmax(axis=1) == y
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == y[:, None]).any(axis=1)


def _top_k(k: int) -> Callable[[Arrays, Any, Arrays | None], Score]:
    def compute(outputs: Arrays, labels: Any, reference: Arrays | None) -> Score:
        return Score(round(float(top_k_hits(outputs, labels, k).mean()) * 100.0, 4))

    return compute


def _fidelity(outputs: Arrays, labels: Any, reference: Arrays | None, tie_margin: float = 0.0) -> Score:
    from pipeline.agent.measure import agreement_within_ties, sqnr_db

    if reference is None:
        raise SpecError("metric fidelity compares with the fp32 outputs; none were given")
    missing = [n for n in reference if n not in outputs]
    if missing:
        raise SpecError(f"metric fidelity: outputs {missing} are missing from the run (it has {list(outputs)})")
    extras: dict[str, float] = {}
    agreements = []
    for name, ref in reference.items():
        got = outputs[name].reshape(ref.shape)
        extras[f"sqnr_db.{name}"] = round(sqnr_db(ref, got), 3)
        if ref.ndim == 2 and ref.shape[1] > 1:
            extras[f"agreement.{name}"] = round(float((got.argmax(1) == ref.argmax(1)).mean()) * 100.0, 4)
            agreements.append(extras[f"agreement.{name}"] if tie_margin <= 0.0 else
                              round(agreement_within_ties(ref, got.argmax(1), tie_margin), 4))
    if not agreements:
        raise SpecError(f"metric fidelity gates on the top-1 agreement of outputs shaped (N, classes); outputs "
                        f"{', '.join(f'{n} {tuple(r.shape)}' for n, r in reference.items())} have none: use metric "
                        "map or your own")
    extras["sqnr_db"] = min(v for k, v in extras.items() if k.startswith("sqnr_db."))
    return Score(min(agreements), extras)


def _detections(outputs: Arrays) -> Arrays:
    missing = [n for n in DETECTION_OUTPUTS if n not in outputs]
    if missing:
        raise SpecError(f"metric map reads outputs {list(DETECTION_OUTPUTS)}; {missing} are not among the model's "
                        f"outputs {list(outputs)}: name them (outputs: [...]) or produce them with "
                        "evaluation.postprocess (padded detections: boxes (N, K, 4) xyxy pixels, scores (N, K), "
                        "classes (N, K))")
    return {n: outputs[n] for n in DETECTION_OUTPUTS}


def detection_labels(labels: Any, n: int) -> list[dict[str, Any]]:
    """Per-sample ``{"boxes": [[x1, y1, x2, y2], ...], "classes": [...]}`` (else one line: exit 2)."""
    ok = isinstance(labels, list) and len(labels) == n and all(
        isinstance(s, dict) and "boxes" in s and "classes" in s
        and len(np.reshape(np.asarray(s["boxes"], dtype=float), (-1, 4))) == len(s["classes"]) for s in labels)
    if not ok:
        raise InputFileError(f"metric map reads one label per sample ({n}), each {{'boxes': [[x1, y1, x2, y2], ...] "
                             f"(pixels), 'classes': [int, ...]}} with one class per box; got {type(labels).__name__}"
                             + (f" of {len(labels)}" if isinstance(labels, (list, np.ndarray)) else ""))
    return [{"boxes": np.reshape(np.asarray(s["boxes"], dtype=float), (-1, 4)).tolist(),
             "classes": [int(c) for c in s["classes"]]} for s in labels]


def _map(outputs: Arrays, labels: Any, reference: Arrays | None) -> Score:
    from pipeline.metrics_detection import coco_map

    dets = _detections(outputs)
    figures = coco_map(dets, detection_labels(labels, len(dets["scores"])))
    return Score(round(figures["map"], 4), {"map50": round(figures["map50"], 4), "map75": round(figures["map75"], 4)})


BUILTIN: dict[str, Metric] = {
    "top1": Metric("top1", True, _top_k(1)),
    "top5": Metric("top5", True, _top_k(5)),
    "fidelity": Metric("fidelity", True, _fidelity, needs_labels=False),
    # float16 boxes (0.06 px steps above 64 px) moved the detector's fp32 mAP by 0.03 points; the
    # postprocessed detections are small, so they travel as float32
    "map": Metric("map", True, _map),
}


def fidelity(tie_margin: float) -> Metric:
    """``fidelity`` gated on agreement within fp32's ties (``evaluation.tie_margin``; strict
    agreement stays among the extras), the same rule as the device's fast path."""
    if tie_margin <= 0.0:
        return BUILTIN["fidelity"]
    return Metric("fidelity", True, lambda o, y, r: _fidelity(o, y, r, tie_margin), needs_labels=False)


def counts_samples(metric: Metric) -> bool:
    """Whether ``metric`` is a percentage of samples, each moving it 100/n points: the built-in top1,
    top5 and fidelity (its agreement); not mAP, nor a user metric (which may share their names)."""
    if metric.name in ("top1", "top5"):
        return metric is BUILTIN[metric.name]
    return metric.name == "fidelity" and not metric.needs_labels


def spec_metric(spec: "PipelineSpec") -> Metric:
    """The one metric a spec names (``evaluation.metric``): what the INT8 search optimises and the
    build's reference, the device results, the gate, the report and the nightly hold."""
    from pipeline.stages.inputs import spec_folder

    m = spec.evaluation.metric
    if isinstance(m, str):
        return fidelity(spec.evaluation.tie_margin) if m == "fidelity" else BUILTIN[m]
    return user_metric(m.callable, m.name, m.higher_is_better, spec_folder(spec),
                       f"{spec.source_path}: field 'evaluation.metric.callable'")


def spec_sources(spec: "PipelineSpec") -> dict[str, str]:
    """The user's code the spec's metric runs: ``module:function`` -> sha256 of the file of its
    module, for the user metric and ``evaluation.postprocess``. Part of the INT8 build's cache key
    (the search scores with them) and of the reference's provenance, so editing them reruns what
    they decide; a module they import is not followed."""
    import inspect

    from pipeline.cache import sha256_file
    from pipeline.stages.inputs import import_callable, spec_folder

    m = spec.evaluation.metric
    refs = {"evaluation.metric.callable": None if isinstance(m, str) else m.callable,
            "evaluation.postprocess": spec.evaluation.postprocess}
    out: dict[str, str] = {}
    for field_name, ref in refs.items():
        if ref:
            fn = import_callable(ref, f"{spec.source_path}: field '{field_name}'", spec_folder(spec))
            path = inspect.getsourcefile(fn)
            out[ref] = sha256_file(Path(path)) if path else "no source file"
    return out


Postprocess = Callable[[Arrays], Arrays]


def spec_postprocess(spec: "PipelineSpec") -> tuple[Postprocess, Path] | None:
    """``evaluation.postprocess``: the function and the file of its module (which ships in the
    release, so it is one file, numpy only); None when the spec has none."""
    import inspect

    from pipeline.stages.inputs import import_callable, spec_folder

    if not spec.evaluation.postprocess:
        return None
    where = f"{spec.source_path}: field 'evaluation.postprocess'"
    fn = import_callable(spec.evaluation.postprocess, where, spec_folder(spec))
    path = inspect.getsourcefile(fn)
    if path is None:
        raise SpecError(f"{where}: {spec.evaluation.postprocess} has no source file to ship with the release")
    return fn, Path(path)


def postprocessed(spec: "PipelineSpec", outputs: Arrays, batch: int, post: Postprocess | None) -> Arrays:
    """``outputs`` through the spec's postprocess one batch at a time, as the device runs it;
    what it raises or returns wrongly is one line naming it (exit 1)."""
    from pipeline.agent.outputs import concat
    from pipeline.stages.inputs import user_code_error

    if post is None:
        return outputs
    ref, where = spec.evaluation.postprocess, f"{spec.source_path}: field 'evaluation.postprocess'"
    n = len(next(iter(outputs.values())))
    parts = []
    for start in range(0, n, batch):
        try:
            got = post({k: v[start:start + batch] for k, v in outputs.items()})
        except EdgeshipError:
            raise
        except Exception as exc:  # user code: any type
            raise user_code_error(where, str(ref), exc) from exc
        if not isinstance(got, dict) or not got or not all(isinstance(v, np.ndarray) for v in got.values()):
            raise UserCodeError(f"{where}: {ref} returned {type(got).__name__}; a postprocess returns a dict "
                                "output name -> numpy array, samples on axis 0")
        parts.append(got)
    return concat(parts)


def user_metric(ref: str, name: str, higher_is_better: bool, beside: Path | None, where: str) -> Metric:
    """A metric of the user's: ``module:function(outputs, labels) -> float | {"value": float, ...}``,
    imported as the spec's factories are (modules beside the spec importable)."""
    from pipeline.stages.inputs import import_callable, user_code_error

    fn = import_callable(ref, where, beside)

    def compute(outputs: Arrays, labels: Any, reference: Arrays | None) -> Score:
        try:
            got = fn(outputs, labels)
        except EdgeshipError:
            raise
        except Exception as exc:  # user code: any type
            raise user_code_error(where, ref, exc) from exc
        return _user_score(got, ref, where)

    return Metric(name, higher_is_better, compute)


def _user_score(got: Any, ref: str, where: str) -> Score:
    value, extras = (got.get("value"), {k: v for k, v in got.items() if k != "value"}) if isinstance(got, dict) \
        else (got, {})
    if not _number(value) or not all(_number(v) for v in extras.values()):
        shown = type(got).__name__ if not isinstance(got, dict) else f"a dict {sorted(got)}"
        raise UserCodeError(f"{where}: {ref} returned {shown}; a metric returns a float, or a dict with a float "
                            "'value' and other float figures (reported beside it)")
    return Score(float(value), {str(k): float(v) for k, v in extras.items()})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
