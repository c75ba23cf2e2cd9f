"""Each device run scored on the host with the spec's one metric (pipeline/metrics.py).

The agent returns a run's raw outputs (after ``evaluation.postprocess``) packed in its reply; the
labels and the fp32 reference outputs never leave the host: the build keeps them beside the
release (``<out>/evaluation/``, :func:`write_host_eval`), not in it. Here a run's row gets
``accuracy`` (the metric's value, the budget's units), ``metrics`` (its extra figures),
``accuracy_drop_pp`` (:func:`pipeline.metrics.drop_pp`), its paired ``accuracy_drop_interval``
(pipeline/validate/paired.py) and ``outputs`` (the packed text; written to the outputs side file,
pipeline/validate/outputs_file.py, never into results.json).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SpecError

HOST_EVAL = "evaluation"  # beside release/ in the build's output folder; host only
NO_INTERVAL = ("no drop interval for {metric} under accuracy.decision: point: it has no per-sample outcomes, and its "
               "paired bootstrap ({evaluations} evaluations of the metric) runs only under accuracy.decision: upper_bound")


@dataclass
class HostEval:
    """The evaluation labels (class indices or per-sample objects) and the fp32 reference outputs
    after postprocess, for the release they were built with."""

    labels: Any
    reference: dict[str, np.ndarray]


def host_eval_dir(release_dir: Path) -> Path:
    return release_dir.parent / HOST_EVAL


def _jsonable(labels: Any) -> Any:
    if isinstance(labels, np.ndarray):
        return {"classes": labels.astype(np.int64).tolist()}
    return {"objects": json.loads(json.dumps(labels, default=lambda v: v.tolist() if hasattr(v, "tolist") else _no(v)))}


def _no(value: Any) -> Any:
    raise SpecError(f"evaluation labels hold a {type(value).__name__}; label objects are kept on the host as JSON: "
                    "numbers, strings, lists and dicts (e.g. {'boxes': [[x1, y1, x2, y2]], 'classes': [3]})")


def write_host_eval(release_dir: Path, release_id: str, labels: Any, reference: dict[str, np.ndarray]) -> Path:
    """``<out>/evaluation/``: labels.json, reference.npz (fp32 outputs, postprocessed), release_id."""
    folder = host_eval_dir(release_dir)
    tmp = folder.with_name(f".{HOST_EVAL}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "labels.json").write_text(json.dumps(None if labels is None else _jsonable(labels)))
    names = list(reference)
    np.savez_compressed(tmp / "reference.npz", **{f"o{i}": reference[n] for i, n in enumerate(names)})
    (tmp / "outputs.json").write_text(json.dumps(names))  # npz member names cannot hold every ONNX name
    (tmp / "release_id").write_text(release_id)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def read_host_eval(release_dir: Path | None, release_id: str | None) -> HostEval | None:
    """What :func:`write_host_eval` kept for ``release_id``; None when this host did not build it."""
    if release_dir is None:
        return None
    folder = host_eval_dir(release_dir)
    try:
        if (folder / "release_id").read_text() != release_id:
            return None
        stored = json.loads((folder / "labels.json").read_text())
        names = json.loads((folder / "outputs.json").read_text())
        with np.load(folder / "reference.npz", allow_pickle=False) as npz:
            reference = {n: npz[f"o{i}"] for i, n in enumerate(names)}
    except (OSError, ValueError, KeyError):
        return None
    labels = None if stored is None else (np.asarray(stored["classes"], np.int64) if "classes" in stored
                                          else stored["objects"])
    return HostEval(labels, reference)


def score_rows(rows: list[dict[str, Any]], raw: dict[str, Any], metric: Any, reference_value: float,
               host: HostEval | None, tie_margin: float = 0.0, slow_intervals: bool = False) -> None:
    """Set each row's ``accuracy``, ``metrics``, ``accuracy_drop_pp``, ``accuracy_drop_interval``,
    ``outcomes`` and ``outputs`` from the raw outputs its run returned. Without them (an agent that
    sent none) or without the host's labels (a release built elsewhere), only ``top1`` and
    ``fidelity`` keep the device's fast-path figures (paired.attach_drop_intervals)."""
    from pipeline.agent.outputs import unpack
    from pipeline.metrics import drop_pp
    from pipeline.validate.baseline import pack_outcomes
    from pipeline.validate.paired import SLOW_METRIC_RESAMPLES, output_interval

    by_id = {r.get("id"): r for r in raw.get("results", [])}
    for row in rows:
        packed = (by_id.get(row["id"]) or {}).get("outputs")
        if row.get("error"):
            continue
        if not packed or host is None:
            if metric.name not in ("top1", "fidelity"):
                row["accuracy"] = row["accuracy_drop_pp"] = None
            continue
        row["outputs"] = packed
        outputs = unpack(packed)
        score = metric.evaluate(outputs, host.labels, host.reference)
        row["accuracy"] = score.value
        row["metrics"] = score.extras
        row["accuracy_drop_pp"] = drop_pp(metric, reference_value, score.value)
        interval, outcomes = output_interval(metric, outputs, host, tie_margin, slow_intervals)
        row["accuracy_drop_interval"] = interval
        if interval is None:  # say why, rather than leave the reader guessing (reports print it)
            row["accuracy_drop_interval_note"] = NO_INTERVAL.format(metric=metric.name,
                                                                     evaluations=2 * SLOW_METRIC_RESAMPLES)
        if outcomes is not None:
            row["outcomes"] = pack_outcomes(outcomes)
