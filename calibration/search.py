"""The one INT8 search every backend runs: method choice, fallback, budget, one report.

A backend's INT8 support is a *candidate builder* (:class:`CandidateBuilder`): given a range
method and a set of layers to keep in float, it builds a :class:`Candidate` in its own format
(a QDQ ONNX model, an ncnn param/bin, a PT2E graph) that can run samples, write itself, and say
what it did. Everything else is here, once:

1. every method is built and run on the calibration holdout and scored against the fp32
   reference with the metric the caller passes (:class:`Metric`);
2. the best method wins by holdout output SQNR (continuous, so meaningful on a small holdout),
   then by the metric;
3. with a budget the holdout drop misses, the builder ranks its layers and
   :func:`calibration.sensitivity.choose_fallback` keeps the fewest most sensitive ones in
   float that meet it, each set checked by running the real candidate;
4. one typed :class:`SearchReport` says what was chosen and why (``to_dict`` is the
   ``calibration`` block of the conversion report; :func:`summary` the results.json one).

The metric is a value: anything with ``name``, ``higher_is_better`` and
``score(outputs, reference_or_labels) -> float``. The holdout's labels are passed when it has
them, else the fp32 outputs. ``drop_pp`` is in the metric's points (the increase for a
lower-is-better metric), the quantity the budget is checked against.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from calibration.config import FallbackLayer
from calibration.metrics import accuracy, sqnr_db, top1_agreement
from calibration.sensitivity import FallbackResult, LayerSensitivity, choose_fallback, meets, shortfall
from pipeline.metrics import drop_pp

#: name -> array, samples on axis 0 (model inputs or outputs)
Arrays = dict[str, np.ndarray]

# Each method tried and each fallback set checked is a sub-step a user waits on (minutes on a
# large model): one INFO record each, ``progress`` (done, total) where the total is known.
_LOG = logging.getLogger(__name__)

#: the report keys results.json keeps per run (README, results schema: ``calibration``)
SUMMARY_KEYS = ("method", "reason", "budget_met", "budget_reason", "fallback_layers", "calibration_time_s",
                "stats_cache_hit")


class Metric(Protocol):
    """What the search optimises and the budget is written in."""

    name: str
    higher_is_better: bool

    def score(self, outputs: Arrays, target: Any) -> float:
        """The metric of ``outputs`` against labels or the fp32 outputs (an ``Arrays``)."""


def first(outputs: Arrays) -> np.ndarray:
    """The first output (the classifier's logits for the built-in metrics)."""
    return next(iter(outputs.values()))


@dataclass(frozen=True)
class Top1:
    """Top-1 accuracy (%) against integer labels."""

    name: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def score(self, outputs: Arrays, target: Any) -> float:
        return accuracy(first(outputs), np.asarray(target))


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement (%) with the fp32 outputs, of the worst output shaped (N, classes) (the
    first output when none is); a swap between classes fp32 ranks within ``tie_margin`` of each
    other counts as agreement (:func:`calibration.metrics.top1_agreement`)."""

    tie_margin: float = 0.0
    higher_is_better: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return "agreement_within_ties" if self.tie_margin > 0.0 else "top1_agreement"

    def score(self, outputs: Arrays, target: Any) -> float:
        names = [k for k, v in target.items() if v.ndim == 2 and v.shape[1] > 1] or [next(iter(target))]
        return min(top1_agreement(target[k], np.asarray(outputs[k]).reshape(target[k].shape), self.tie_margin)
                   for k in names)


def default_metric(labelled: bool, tie_margin: float = 0.0) -> Metric:
    """Accuracy when the calibration holdout has labels, else agreement with fp32."""
    return Top1() if labelled else Agreement(tie_margin)


class Candidate(Protocol):
    """One INT8 model in a backend's format: a method's ranges with some layers kept float."""

    method: str
    float_layers: tuple[str, ...]

    def run(self, x: Arrays) -> Arrays:
        """Outputs on the samples ``x`` (input name -> array)."""

    def write(self, workdir: Path) -> list[str]:
        """Write the artifact's files under ``workdir``; return their names."""

    def notes(self) -> dict[str, Any]:
        """Format-specific facts for the report (kept float, scales, pairing), JSON-able."""


@dataclass
class Ranking:
    """Layers for the fallback, in the order the fallback takes them (most sensitive first; on ONNX
    Runtime by noise removed per unit of time); ``solo_sqnr(name)``, where the builder can measure
    it, is the output SQNR with only that layer quantized (for the report); ``close(names)``, where
    the builder knows its runtime's costs, is ``names`` plus the int8 runs between float layers
    that cost the runtime more than they save (:mod:`calibration.islands`), all of them layers of
    ``layers``."""

    layers: list[LayerSensitivity]
    solo_sqnr: Callable[[str], float] | None = None
    close: Callable[[list[str]], list[str]] | None = None


class CandidateBuilder(Protocol):
    """A backend's INT8 support."""

    def candidate(self, method: str, float_layers: Sequence[str]) -> Candidate:
        """The candidate for ``method`` with ``float_layers`` kept in float."""

    def rank(self, method: str, holdout: "Holdout", reference: Arrays) -> Ranking:
        """The layers ``float_layers`` may name, most sensitive first, under ``method``."""


@dataclass
class Holdout:
    """The calibration holdout: inputs and, when the calibration set has them, labels."""

    x: Arrays
    labels: Any = None

    def __len__(self) -> int:
        return int(first(self.x).shape[0])

    def take(self, idx: np.ndarray) -> "Holdout":
        """The samples at ``idx`` (labels too: an array, or a list of per-sample objects)."""
        labels = self.labels
        if labels is not None:
            labels = labels[idx] if isinstance(labels, np.ndarray) else [labels[int(i)] for i in idx]
        return Holdout({k: v[idx] for k, v in self.x.items()}, labels)


@dataclass(frozen=True)
class SearchOptions:
    """Methods to try (one: requested), the budget (None: none), the fallback switch, and the
    fidelity floor: the least holdout output SQNR (dB) to ship (None: none)."""

    methods: tuple[str, ...]
    budget_pp: float | None = None
    fallback: bool = True
    max_fallback_layers: int | None = None
    min_sqnr_db: float | None = None


@dataclass
class SearchReport:
    """What one INT8 search chose and measured; every holdout figure is against fp32.

    Attributes:
        metric: the metric's name (its points are the budget's).
        method: the range method of the shipped candidate.
        reason: one sentence on why.
        method_scores: holdout figures per method tried (``sqnr_db``, ``top1_agreement``,
            the metric, ``fp32_<metric>``, ``drop_pp``, ``n``).
        budget_pp, budget_met, budget_reason: the budget, whether the holdout drop is within it
            (None without a budget) and why not.
        holdout: figures of the shipped candidate.
        fallback_layers: layers kept in float by the fallback, in the order it took them (most
            sensitive first; ONNX Runtime: by noise removed per unit of time, then the closed islands).
        fallback_tried: (float layers, holdout drop) per fallback candidate run.
        calibration_samples, holdout_samples: sizes of the fit and holdout splits.
        calibration_time_s: wall time of the whole INT8 build's calibration.
        stats_cache_hit: the activation statistics came from the cache.
        islands_closed: layers the fallback added to float because, on the target runtime, their
            int8 run between float layers cost more in layout crossings than it saved.
        per_layer_sqnr: per-tensor SQNR of the shipped model (where the builder measures it).
        notes: the builder's format-specific facts (:meth:`Candidate.notes`).
    """

    metric: str
    method: str
    reason: str
    method_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    budget_pp: float | None = None
    budget_met: bool | None = None
    budget_reason: str = ""
    holdout: dict[str, float] = field(default_factory=dict)
    fallback_layers: list[FallbackLayer] = field(default_factory=list)
    fallback_tried: list[tuple[int, float]] = field(default_factory=list)
    calibration_samples: int = 0
    holdout_samples: int = 0
    calibration_time_s: float = 0.0
    stats_cache_hit: bool = False
    islands_closed: list[str] = field(default_factory=list)
    per_layer_sqnr: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN as null, tuples as lists)."""
        return _jsonable(asdict(self))


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The results.json ``calibration`` block of one run from a :meth:`SearchReport.to_dict`."""
    return {k: report[k] for k in SUMMARY_KEYS if k in report}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def score(outputs: Arrays, reference: Arrays, holdout: Holdout, metric: Metric) -> dict[str, float]:
    """Holdout figures of ``outputs``: worst-output SQNR, strict top-1 agreement (first output),
    the metric, fp32's value of it, and the drop in the metric's points."""
    target = holdout.labels if holdout.labels is not None else reference
    value, base = metric.score(outputs, target), metric.score(reference, target)
    figures = {
        "sqnr_db": min(sqnr_db(reference[k], np.asarray(outputs[k]).reshape(reference[k].shape)) for k in reference),
        "top1_agreement": top1_agreement(first(reference), first(outputs)),
        "n": float(len(holdout)),
        metric.name: value,
        f"fp32_{metric.name}": base,
        "drop_pp": drop_pp(metric, base, value),
    }
    return {k: round(float(v), 4) for k, v in figures.items()}


def _oriented(metric: Metric, value: float) -> float:
    return value if metric.higher_is_better else -value


#: The method race. With at least RACE_MIN_SAMPLES holdout samples, every method is first scored
#: on an evenly strided third of the holdout; a method whose output SQNR there is more than
#: RACE_MARGIN_DB below the best one's stops, and only the others run the rest. The winner is
#: chosen on the whole holdout, as without the race. SQNR averages over every output value, so a
#: third of the holdout ranks methods that far apart reliably (EfficientNet-Lite0 / MobileNetV2
#: methods differ by 1-10 dB); the race halves the search's model runs where one method leads.
RACE_MIN_SAMPLES = 60
RACE_MARGIN_DB = 1.0


def _merge(parts: list[tuple[np.ndarray, Arrays]]) -> Arrays:
    """Outputs run on disjoint index sets, put back in holdout order."""
    order = np.argsort(np.concatenate([idx for idx, _ in parts]))
    return {k: np.concatenate([np.asarray(out[k]) for _, out in parts])[order] for k in parts[0][1]}


def _race(builder: CandidateBuilder, methods: Sequence[str], holdout: Holdout, reference: Arrays,
          metric: Metric) -> tuple[dict[str, Candidate], dict[str, dict[str, float]], list[str]]:
    """Every method's candidate and holdout figures, and the methods stopped early (RACE_*)."""
    candidates: dict[str, Candidate] = {}
    n = len(holdout)
    race = len(methods) > 1 and n >= RACE_MIN_SAMPLES
    idx = np.arange(0, n, 3) if race else np.arange(n)
    rest = np.setdiff1d(np.arange(n), idx)
    # without a race the first pass is the whole holdout: no copy of it
    part, ref_part = (holdout.take(idx), {k: v[idx] for k, v in reference.items()}) if race else (holdout, reference)
    scores: dict[str, dict[str, float]] = {}
    first_outputs: dict[str, Arrays] = {}
    for i, m in enumerate(methods, 1):
        candidates[m] = builder.candidate(m, ())
        first_outputs[m] = candidates[m].run(part.x)
        scores[m] = score(first_outputs[m], ref_part, part, metric)
        _LOG.info("method %s (%d/%d): holdout SQNR %.2f dB, drop %.2f pp%s", m, i, len(methods), scores[m]["sqnr_db"],
                  scores[m]["drop_pp"], f" on {len(idx)} of {n} samples" if race else "",
                  extra={"progress": (i, len(methods))})
    best = max(s["sqnr_db"] for s in scores.values())
    raced = [m for m in methods if race and scores[m]["sqnr_db"] < best - RACE_MARGIN_DB]
    for m in methods:
        if race and m not in raced:
            outputs = _merge([(idx, first_outputs[m]), (rest, candidates[m].run(holdout.take(rest).x))])
            scores[m] = score(outputs, reference, holdout, metric)
    return candidates, scores, raced


def _choose(scores: dict[str, dict[str, float]], metric: Metric, n: int, raced: Sequence[str] = ()) -> tuple[str, str]:
    """The best method (SQNR, then the metric) among those not stopped by the race, and why."""
    best = max((m for m in scores if m not in raced),
               key=lambda m: (scores[m]["sqnr_db"], _oriented(metric, scores[m][metric.name])))
    if len(scores) == 1:
        return best, f"{best}: requested explicitly"
    others = ", ".join(f"{m} {s['sqnr_db']:.2f}" for m, s in scores.items() if m != best and m not in raced)
    stopped = ", ".join(f"{m} {scores[m]['sqnr_db']:.2f}" for m in raced)
    vs = "; ".join(x for x in (others, f"{stopped} on {int(scores[raced[0]]['n'])} samples, stopped over "
                                       f"{RACE_MARGIN_DB:g} dB behind" if raced else "") if x)
    return best, (f"{best}: highest holdout output SQNR ({scores[best]['sqnr_db']:.2f} dB vs {vs}) on {n} "
                  f"held-out calibration samples; {metric.name} {scores[best][metric.name]:.2f}")


@dataclass
class SearchResult:
    """The candidate to ship and the report."""

    candidate: Candidate
    report: SearchReport


def search(builder: CandidateBuilder, holdout: Holdout, reference: Arrays, options: SearchOptions,
           metric: Metric) -> SearchResult:
    """Choose the method, fall back where the budget needs it, report (see the module docstring).

    Args:
        builder: the backend's candidate builder.
        holdout: calibration holdout (never the evaluation set).
        reference: the fp32 outputs on ``holdout.x``, from the backend's own fp32 model.
        options: methods, budget, fallback.
        metric: what is scored and budgeted.
    """
    t0 = time.perf_counter()
    candidates, scores, raced = _race(builder, options.methods, holdout, reference, metric)
    method, reason = _choose(scores, metric, len(holdout), raced)
    report = SearchReport(metric=metric.name, method=method, reason=reason, method_scores=scores,
                          budget_pp=options.budget_pp, holdout=scores[method], holdout_samples=len(holdout))
    final = candidates[method]
    budget, floor = options.budget_pp, options.min_sqnr_db
    if not meets(report.holdout, budget, floor) and options.fallback:
        final = _fallback(builder, final, holdout, reference, options, metric, report)
    elif budget is not None or floor is not None:
        # here the holdout meets both, or misses one with the fallback off
        missed = shortfall(report.holdout, budget, floor)
        report.budget_met = not missed
        report.budget_reason = f"{missed} and fallback is off" if missed else ""
    report.calibration_time_s = round(time.perf_counter() - t0, 3)
    return SearchResult(final, report)


def _close_islands(result: FallbackResult, ranked: list[LayerSensitivity], close: Callable[[list[str]], list[str]],
                   evaluate: Callable[[list[str]], dict[str, float]], options: SearchOptions) -> list[str]:
    """Add to ``result`` the int8 runs that ``close`` (the ranking's) says lose time; kept only
    where the real candidate still meets the budget and the floor (more float is nearly always
    more fidelity, not always). Returns the added layers."""
    names = [layer.name for layer in result.layers]
    extra = close(names)[len(names):]
    if not extra:
        return []
    figures = evaluate(names + extra)
    if not meets(figures, options.budget_pp, options.min_sqnr_db):
        _LOG.info("closing %d int8 island layer(s) missed the budget or floor: kept the fallback as chosen", len(extra))
        return []
    by_name = {s.name: s for s in ranked}
    result.layers += [by_name[n].kept_float() for n in extra]
    result.metrics = figures
    return extra


def _fallback(builder: CandidateBuilder, base: Candidate, holdout: Holdout, reference: Arrays,
              options: SearchOptions, metric: Metric, report: SearchReport) -> Candidate:
    """Rank, then ``choose_fallback`` with real candidates; fill the report; the one to ship."""
    _LOG.info("%s: ranking layers for the float fallback",
              shortfall(report.holdout, options.budget_pp, options.min_sqnr_db))
    ranking = builder.rank(base.method, holdout, reference)
    built: dict[tuple[str, ...], Candidate] = {}

    def evaluate(names: list[str]) -> dict[str, float]:
        built[tuple(names)] = cand = builder.candidate(base.method, tuple(names))
        figures = score(cand.run(holdout.x), reference, holdout, metric)
        _LOG.info("fallback: %d of %d layers in float: holdout drop %.2f pp, SQNR %.2f dB", len(names),
                  len(ranking.layers), figures["drop_pp"], figures["sqnr_db"])
        return figures

    result = choose_fallback(ranking.layers, evaluate, report.holdout, options.budget_pp, options.max_fallback_layers,
                             options.min_sqnr_db)
    if result.budget_met and result.layers and ranking.close is not None:
        report.islands_closed = _close_islands(result, ranking.layers, ranking.close, evaluate, options)
    if ranking.solo_sqnr is not None:
        for layer in result.layers:
            layer.sqnr_db = round(ranking.solo_sqnr(layer.name), 3)
    report.fallback_layers, report.fallback_tried = result.layers, result.tried
    report.budget_met, report.budget_reason = result.budget_met, result.reason
    if not result.budget_met and result.tried:
        report.budget_reason += "; tried " + ", ".join(f"{k} layer(s): {d:.2f} pp" for k, d in result.tried)
    # the shipped candidate is the last one checked, so the listed layers are the ones in it
    key = tuple(layer.name for layer in result.layers)
    if key in built:
        report.holdout = result.metrics
        return built[key]
    return base
