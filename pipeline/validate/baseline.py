"""The pinned baseline and the rule that compares a run with it.

A baseline (``baselines/<spec>/<target>.json`` in the project, meant to be committed) keeps, per
device x backend x precision, the numbers of the run it was pinned from *and its per-sample
outcomes* (right or wrong, packed bits), so tonight's run is compared with it pair by pair on the
same samples. Comparing with the pinned baseline, not only with the last good run, is what
catches a slow drift: 0.4 pp a night never exceeds a 0.5 pp step, but five nights are 2 pp.

The rule per run (each part only where both sides have the numbers):

* accuracy: the paired drop vs the baseline is over ``tolerance_pp`` *and* significant (its exact
  95 % interval excludes 0), so sampling noise alone never fails a night; a metric without
  per-sample outcomes (map, a user metric) by its value, the drop in its points
  (``pipeline.metrics.drop_pp``: the increase of a lower-is-better metric) over ``tolerance_pp``;
* latency: Mann-Whitney on the raw timings significant and the p50 ratio over
  ``max_latency_regression_pct`` (stats.latency_regression);
* peak RSS and artifact size: grown by more than ``max_growth_pct``.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import BadInput
from pipeline.metrics import drop_pp
from pipeline.validate.stats import MAX_LATENCY_REGRESSION_PCT, discordant, latency_regression, paired_drop_interval
from pipeline.validate.timings import keyed_rows, row_timings, unstable

BASELINE_SCHEMA = "edgeship.baseline/1"
MAX_GROWTH_PCT = 10.0


def pack_outcomes(outcomes: Sequence[bool] | np.ndarray) -> str:
    """Per-sample right/wrong as base64 of packed bits (1,500 samples: 252 characters)."""
    return base64.b64encode(np.packbits(np.asarray(outcomes, dtype=bool)).tobytes()).decode("ascii")


def unpack_outcomes(packed: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))
    return bits[:n].astype(bool)


def baseline_run(row: dict[str, Any], outcomes: Sequence[bool] | np.ndarray | None,
                 timings_ms: Sequence[float] | None = None) -> dict[str, Any]:
    """What a baseline keeps of one run."""
    out: dict[str, Any] = {"accuracy": row.get("accuracy"), "p50_ms": (row.get("latency_ms") or {}).get("p50"),
                           "peak_rss_mb": row.get("peak_rss_mb"), "artifact_bytes": row.get("artifact_bytes"),
                           "artifact_sha256": row.get("artifact_sha256")}
    if outcomes is not None:
        out["n"] = int(np.asarray(outcomes).size)
        out["outcomes"] = pack_outcomes(outcomes)
    if timings_ms is not None:
        out["timings_ms"] = [round(float(t), 4) for t in timings_ms]
        out["unstable"] = unstable(row)
    return out


def write_baseline(path: Path, spec: str, target: str, release_id: str | None, runs: dict[str, dict[str, Any]]) -> Path:
    """Pin ``runs`` ((device/run id) -> baseline_run) as the baseline of ``spec`` on ``target``."""
    doc = {"schema": BASELINE_SCHEMA, "spec": spec, "target": target, "release_id": release_id,
           "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_baseline(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _metric_value(key: str, base: dict[str, Any], row: dict[str, Any], tolerance_pp: float,
                  higher_is_better: bool) -> list[str]:
    """A metric with no per-sample outcomes (map, a user metric): its value against the baseline's,
    the drop in its points as the budget's (an increase for a lower-is-better metric)."""
    if base.get("accuracy") is None or row.get("accuracy") is None:
        return []
    drop = drop_pp(higher_is_better, float(base["accuracy"]), float(row["accuracy"]))
    if drop <= tolerance_pp:
        return []
    worse = "below" if higher_is_better else "above (worse than)"
    return [f"{key}: metric {row['accuracy']:.4g} is {drop:.2f} points {worse} the baseline's {base['accuracy']:.4g}, "
            f"tolerance {tolerance_pp} points"]


def _accuracy(key: str, base: dict[str, Any], outcomes: np.ndarray | None, tolerance_pp: float) -> list[str]:
    if outcomes is None or "outcomes" not in base or int(base["n"]) != outcomes.size:
        return []  # not pairable (no outcomes, or another evaluation set): no interval-aware verdict
    iv = paired_drop_interval(*discordant(unpack_outcomes(base["outcomes"], int(base["n"])), outcomes))
    if iv["drop_pp"] > tolerance_pp and iv["low_pp"] > 0.0:  # type: ignore[operator]
        return [f"{key}: accuracy {iv['drop_pp']:.2f} pp below the baseline (95 % interval "
                f"[{iv['low_pp']:.2f}, {iv['high_pp']:.2f}] pp, n {iv['n']}), tolerance {tolerance_pp} pp"]
    return []


def _growth(key: str, what: str, base: float | None, now: float | None, unit: str, limit_pct: float,
            against: str = "the baseline's") -> list[str]:
    if not base or now is None or (now / base - 1.0) * 100.0 <= limit_pct:
        return []
    return [f"{key}: {what} {now:g} {unit} is {(now / base - 1.0) * 100.0:.1f} % over {against} {base:g} {unit} "
            f"(limit {limit_pct:g} %)"]


def grown(key: str, base: dict[str, Any], row: dict[str, Any], max_growth_pct: float = MAX_GROWTH_PCT,
          against: str = "the baseline's") -> list[str]:
    """Peak RSS or artifact size grown by more than ``max_growth_pct`` against ``base``."""
    return (_growth(key, "peak RSS", base.get("peak_rss_mb"), row.get("peak_rss_mb"), "MB", max_growth_pct, against)
            + _growth(key, "artifact", base.get("artifact_bytes"), row.get("artifact_bytes"), "bytes", max_growth_pct,
                      against))


def compare_run(key: str, base: dict[str, Any], row: dict[str, Any], outcomes: Sequence[bool] | np.ndarray | None,
                timings_ms: Sequence[float] | None, *, tolerance_pp: float,
                max_latency_regression_pct: float = MAX_LATENCY_REGRESSION_PCT,
                max_growth_pct: float = MAX_GROWTH_PCT, higher_is_better: bool = True) -> list[str]:
    """Why tonight's run ``key`` regressed against its baseline ``base`` (empty: it did not)."""
    if outcomes is None and "outcomes" not in base:  # a metric without per-sample outcomes: its value
        found = _metric_value(key, base, row, tolerance_pp, higher_is_better)
    else:
        found = _accuracy(key, base, None if outcomes is None else np.asarray(outcomes, dtype=bool), tolerance_pp)
    if timings_ms is not None and base.get("timings_ms") and not unstable(row) and not unstable(base):
        lat = latency_regression(base["timings_ms"], timings_ms, max_regression_pct=max_latency_regression_pct)
        if lat["regressed"]:
            found.append(f"{key}: p50 {lat['p50_current']} ms is {lat['slower_pct']:.1f} % slower than the baseline's "
                         f"{lat['p50_baseline']} ms (Mann-Whitney p {lat['p_value']:.2g}), limit "
                         f"{max_latency_regression_pct:g} %")
    found += grown(key, base, row, max_growth_pct)
    return found


def _outcomes(row: dict[str, Any]) -> np.ndarray | None:
    n = (row.get("accuracy_drop_interval") or {}).get("n")
    return unpack_outcomes(row["outcomes"], int(n)) if row.get("outcomes") and n else None


def pin_results(results: dict[str, Any], path: Path, folder: Path | None = None) -> Path:
    """Pin every measured run of a results document (with its per-sample outcomes and raw timings;
    ``folder`` holds the document's timings side file) as the baseline."""
    timings = row_timings(results, folder)
    runs = {key: baseline_run(row, _outcomes(row), timings.get(key)) for key, row in keyed_rows(results)
            if not row.get("error")}
    return write_baseline(path, str(results.get("spec")), str(results.get("target")), results.get("release_id"), runs)


def pin_results_file(results_json: Path, path: Path) -> Path:
    """``edgeship baseline pin``: pin the results document of the last deploy or validate."""
    if not results_json.is_file():
        raise BadInput(f"{results_json}: no results to pin; run `edgeship deploy` (or `validate`) for this spec "
                       "and target first, or pass --out with the folder that holds its results.json")
    try:
        results = json.loads(results_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{results_json}: not a results document ({exc}); deploy again to rewrite it") from exc
    return pin_results(results, path, results_json.parent)


def baseline_regressions(results: dict[str, Any], baseline: dict[str, Any], *, tolerance_pp: float,
                         max_latency_regression_pct: float = MAX_LATENCY_REGRESSION_PCT) -> dict[str, list[str]]:
    """(device/run id) -> why that run regressed against the pinned baseline (runs that did not: absent)."""
    found: dict[str, list[str]] = {}
    higher = bool((results.get("reference") or {}).get("higher_is_better", True))
    for key, row in keyed_rows(results):
        base = (baseline.get("runs") or {}).get(key)
        if base is None or row.get("error"):
            continue
        reasons = compare_run(key, base, row, _outcomes(row), row.get("timings_ms"), tolerance_pp=tolerance_pp,
                              max_latency_regression_pct=max_latency_regression_pct, higher_is_better=higher)
        if reasons:
            found[key] = reasons
    return found
