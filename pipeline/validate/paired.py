"""Per-sample paired outcomes on the host, and each run's ``accuracy_drop_interval`` from them.

The agent returns each run's per-sample ``predictions`` (top-1 class); the release's evaluation
data (``data/y.npy`` labels, ``data/reference.npy`` fp32 outputs) is on the host beside it. The same
samples went through fp32 and the candidate, so the drop gets a paired, exact interval:

* ``top1``: fp32 right vs the candidate right, per sample (Clopper-Pearson on the discordant pairs);
* ``fidelity``: agreement with fp32 (within ties when the spec sets ``tie_margin``), a plain
  binomial proportion of disagreements, since fp32 agrees with itself on every sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.agent.measure import agreement_within_ties
from pipeline.validate.baseline import pack_outcomes
from pipeline.validate.stats import Interval, discordant, disagreement_interval, paired_drop_interval


def _load(data_dir: Path, name: str) -> np.ndarray | None:
    path = data_dir / f"{name}.npy"
    return np.load(path, allow_pickle=False) if path.is_file() else None


def candidate_agrees(reference: np.ndarray, pred: np.ndarray, tie_margin: float) -> np.ndarray:
    """Per sample: does the candidate's top-1 agree with fp32 (a swap within fp32's ties counting)?"""
    if tie_margin <= 0.0:
        return pred == reference.argmax(axis=1)
    # The agent's own rule, one sample at a time, so host and device can never disagree on it.
    return np.array([agreement_within_ties(reference[i:i + 1], pred[i:i + 1], tie_margin) > 0.0
                     for i in range(pred.size)], dtype=bool)


def paired_outcomes(predictions: Sequence[int], data_dir: Path, metric: str,
                    tie_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Per sample (fp32 right, candidate right), or None when they cannot be paired here (no
    predictions, the evaluation data missing, or a different number of samples). For fidelity,
    fp32 is right on every sample by definition and the candidate is right where it agrees."""
    reference = _load(data_dir, "reference")
    pred = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if reference is None or pred.size == 0 or len(reference) != pred.size:
        return None
    reference = reference.reshape(pred.size, -1)
    if metric != "top1":
        return np.ones(pred.size, dtype=bool), candidate_agrees(reference, pred, tie_margin)
    labels = _load(data_dir, "y")
    if labels is None or labels.size != pred.size:
        return None
    labels = labels.reshape(-1)
    return reference.argmax(axis=1) == labels, pred == labels


def drop_interval(predictions: Sequence[int], data_dir: Path, metric: str, tie_margin: float = 0.0) -> Interval | None:
    """The run's paired drop interval in pp, or None when the outcomes cannot be paired here."""
    outcomes = paired_outcomes(predictions, data_dir, metric, tie_margin)
    if outcomes is None:
        return None
    if metric == "top1":
        return paired_drop_interval(*discordant(*outcomes))
    agrees = outcomes[1]
    return disagreement_interval(int(agrees.size - agrees.sum()), int(agrees.size))


def attach_drop_intervals(rows: list[dict[str, Any]], raw: dict[str, Any], data_dir: Path, metric: str,
                          tie_margin: float = 0.0) -> None:
    """Set ``accuracy_drop_interval`` and ``outcomes`` (the candidate's per-sample right/wrong,
    packed bits, for pairing with a baseline later) on each row whose agent result carries
    per-sample predictions."""
    by_id = {r.get("id"): r for r in raw.get("results", [])}
    for row in rows:
        predictions = (by_id.get(row["id"]) or {}).get("predictions")
        if predictions is None or row.get("error"):
            continue
        row["accuracy_drop_interval"] = drop_interval(predictions, data_dir, metric, tie_margin)
        outcomes = paired_outcomes(predictions, data_dir, metric, tie_margin)
        if outcomes is not None:
            row["outcomes"] = pack_outcomes(outcomes[1])


# ---- from the raw outputs (the metric registry's runs) ------------------------------------------

SLOW_METRIC_RESAMPLES = 200
"""Resamples of the paired bootstrap for a metric that is not a mean over samples (mAP, user
metrics): each resample scores the whole metric twice (a COCO evaluation of 512 images takes about
a second), so fewer than stats.RESAMPLES; seeded (stats.SEED) like every other interval."""


def output_outcomes(metric: Any, outputs: dict[str, np.ndarray], host: Any,
                    tie_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Per sample (fp32 right, candidate right) for the metrics that are a mean over samples:
    top1/top5 against the labels, fidelity's agreement on its worst (N, classes) output (fp32 agrees
    with itself); None for the others (mAP, user metrics)."""
    from pipeline.metrics import counts_samples, top_k_hits

    if not counts_samples(metric):  # (a user metric may be called top1 or fidelity too)
        return None
    if metric.name in ("top1", "top5"):
        k = int(metric.name[3:])
        return top_k_hits(host.reference, host.labels, k), top_k_hits(outputs, host.labels, k)
    worst: np.ndarray | None = None
    for name, ref in host.reference.items():
        if ref.ndim == 2 and ref.shape[1] > 1 and name in outputs:
            agrees = candidate_agrees(ref, outputs[name].reshape(ref.shape).argmax(1), tie_margin)
            worst = agrees if worst is None or agrees.sum() < worst.sum() else worst
    return None if worst is None else (np.ones(worst.size, dtype=bool), worst)


def _subset(value: Any, idx: np.ndarray) -> Any:
    return value[idx] if isinstance(value, np.ndarray) else [value[i] for i in idx]


def output_interval(metric: Any, outputs: dict[str, np.ndarray], host: Any, tie_margin: float,
                    slow: bool) -> tuple[Interval | None, np.ndarray | None]:
    """The run's paired drop interval in the metric's points, and the candidate's per-sample
    outcomes where the metric has them. Exact for top1/top5/fidelity; the seeded paired bootstrap
    over samples for the others, computed only when ``slow`` (accuracy.decision upper_bound needs
    it: it costs SLOW_METRIC_RESAMPLES x 2 evaluations of the metric)."""
    from pipeline.validate.stats import bootstrap_drop_fn

    outcomes = output_outcomes(metric, outputs, host, tie_margin)
    if outcomes is not None:
        if metric.name == "fidelity":
            agrees = outcomes[1]
            return disagreement_interval(int(agrees.size - agrees.sum()), int(agrees.size)), agrees
        return paired_drop_interval(*discordant(*outcomes)), outcomes[1]
    if not slow:
        return None, None
    n = len(next(iter(outputs.values())))
    sign = 1.0 if metric.higher_is_better else -1.0  # the drop of a lower-is-better metric is its increase

    def value(arrays: dict[str, np.ndarray]) -> Any:
        return lambda idx: sign * metric.evaluate({k: v[idx] for k, v in arrays.items()}, _subset(host.labels, idx),
                                                  {k: v[idx] for k, v in host.reference.items()}).value

    return bootstrap_drop_fn(n, value(host.reference), value(outputs), resamples=SLOW_METRIC_RESAMPLES), None
