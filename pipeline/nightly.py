"""Nightly accuracy-drop checks: deploy every (spec, target), keep the history, catch regressions.

Each run's result is appended to ``<history>/<spec>/<target>.jsonl``. Besides each run's own gate,
a run regresses when its accuracy falls more than ``tolerance_pp`` below the last run of the same
(device, backend, precision) that passed its gate ("last good"). A newer toolchain that quietly
costs accuracy after quantization is therefore caught even while it stays inside the budget.
Each pair leaves results.json, report.md and report.html in its folder; ``--junit`` one file over all.
Where a baseline is pinned, each run is also compared with it (interval-aware, on the same samples),
which catches a slow drift that never exceeds the step from one night to the next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import BadInput, EdgeshipError
from pipeline.metrics import drop_pp
from pipeline.paths import contained
from pipeline.spec import load_spec, load_target
from pipeline.validate.baseline import baseline_regressions, grown, read_baseline
from pipeline.validate.stats import MAX_LATENCY_REGRESSION_PCT, latency_regression
from pipeline.validate.timings import keyed_rows, unstable
from pipeline.validate.trend import read_history

# The reference workloads (examples/<name>.yaml) a nightly deploys when no spec is named: MNIST and
# the two ImageNet models on real labels (MobileNetV2 is per-tensor int8's hard case, the one a
# quantization change is most likely to break). .github/workflows/nightly.yml runs one leg each.
REFERENCE_SPECS = ("mnist", "efficientnet_lite0", "mobilenet_v2")

# Pinned baselines, in the project (meant to be committed): baselines/<spec>/<target>.json
BASELINES = Path("baselines")


def history_file(history: Path, spec_name: str, target_name: str) -> Path:
    return contained(history / spec_name / f"{target_name}.jsonl", history, f"history of {spec_name} on {target_name}")


def _gated_rows(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """(device/run id) -> each row of a nightly entry that passed its own gate, with the night."""
    return {f"{dev['device']}/{row['id']}": {**row, "when": entry.get("when"), "release_id": entry.get("release_id")}
            for dev in entry.get("devices", []) for row in dev.get("runs", [])
            if (row.get("gate") or {}).get("passed")}


def last_good(path: Path) -> dict[str, dict[str, Any]]:
    """(device/run id) -> the newest row that passed its gate without regressing, or that was
    accepted (:func:`accept`).

    A row that regressed is not good even though its own gate passed: otherwise the next night
    compares with it, and a regression inside the budget is red for one night and then forgotten.
    """
    good: dict[str, dict[str, Any]] = {}
    nights: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in read_history(path):
        if "accepted" in entry:
            night = nights.get(entry["accepted"]["night"], {})
            good.update({key: night[key] for key in entry["accepted"]["runs"] if key in night})
            continue
        rows = nights[str(entry.get("when"))] = _gated_rows(entry)
        good.update({key: row for key, row in rows.items() if not row.get("regressions")})
    return good


def accept(path: Path, runs: list[str], reason: str) -> dict[str, Any]:
    """Accept the newest night's regressed runs as the new last good (an intended change: a bigger
    artifact from a deliberate float fallback, a new toolchain's latency). Appends an entry that
    :func:`last_good` applies and returns it.

    Args:
        path: The history file of one (spec, target).
        runs: Run ids (``ncnn-int8``) or device/run ids to accept; empty: every regressed run.
        reason: Why, kept in the history beside the night it accepts.

    Raises:
        BadInput: No history, nothing regressed on the newest night, a run it does not hold or
            that failed its own gate (a gate failure is fixed, not accepted), or no reason.
    """
    nights = [e for e in read_history(path) if "accepted" not in e]
    if not reason.strip():
        raise BadInput(f"{path}: --reason is empty: say why the change is intended (it stays in the history)")
    if not nights:
        raise BadInput(f"{path}: no nightly history to accept from: run `edgeship nightly` first")
    newest = nights[-1]
    gated = _gated_rows(newest)
    regressed = [key for key, row in gated.items() if row.get("regressions")]
    def names(key: str, run: str) -> bool:  # "local/ncnn-int8" is named by itself or by "ncnn-int8"
        return key == run or key.endswith("/" + run)

    chosen = [k for k in gated if any(names(k, r) for r in runs)] if runs else regressed
    unknown = [r for r in runs if not any(names(k, r) for k in gated)]
    if unknown:
        raise BadInput(f"{path}: --run {', '.join(unknown)}: not a run of the night of {newest.get('when')} that "
                       f"passed its gate; those are: {', '.join(gated) or 'none'}")
    if not chosen:
        raise BadInput(f"{path}: the night of {newest.get('when')} has no regressed run to accept")
    entry = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": newest.get("spec"),
             "target": newest.get("target"), "accepted": {"night": str(newest.get("when")), "runs": chosen,
                                                          "reason": reason.strip()}}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def _slower(key: str, row: dict[str, Any], prev: dict[str, Any], limit_pct: float) -> list[str]:
    """A latency regression against the last good run: Mann-Whitney on both nights' raw timings
    significant and the p50 slower than ``limit_pct`` (a night of jitter is neither)."""
    if not row.get("timings_ms") or not prev.get("timings_ms") or unstable(row) or unstable(prev):
        return []
    lat = latency_regression(prev["timings_ms"], row["timings_ms"], max_regression_pct=limit_pct)
    if not lat["regressed"]:
        return []
    return [f"{key}: p50 {lat['p50_current']} ms is {lat['slower_pct']:.1f} % slower than the last good run's "
            f"{lat['p50_baseline']} ms on {prev.get('when')} (Mann-Whitney p {lat['p_value']:.2g}), limit {limit_pct:g} %"]


def regressions_by_run(results: dict[str, Any], good: dict[str, dict[str, Any]], tolerance_pp: float,
                       max_latency_regression_pct: float = MAX_LATENCY_REGRESSION_PCT) -> dict[str, list[str]]:
    """(device/run id) -> why that run regressed against its last good run (runs that did not: absent)."""
    found: dict[str, list[str]] = {}
    ref = results.get("reference") or {}
    # the spec's one metric, in its points: a lower-is-better metric regresses when it rises
    higher, name = ref.get("higher_is_better", True), ref.get("metric", "accuracy")
    for key, row in keyed_rows(results):
        prev = good.get(key)
        if prev is None:
            continue
        why = _slower(key, row, prev, max_latency_regression_pct) + grown(key, prev, row, against="the last good run's")
        if row.get("accuracy") is not None and prev.get("accuracy") is not None:
            fall = drop_pp(higher, prev["accuracy"], row["accuracy"])
            if fall > tolerance_pp and higher:
                why.insert(0, f"{key}: accuracy {row['accuracy']:.2f}% is {fall:.2f} pp below the last good "
                              f"run ({prev['accuracy']:.2f}% on {prev.get('when')}), tolerance {tolerance_pp} pp")
            elif fall > tolerance_pp:
                why.insert(0, f"{key}: {name} {row['accuracy']:.4g} is {fall:.2f} points above (worse than) the last "
                              f"good run ({prev['accuracy']:.4g} on {prev.get('when')}), tolerance {tolerance_pp} points")
        if why:
            found[key] = why
    return found


def regressions(results: dict[str, Any], good: dict[str, dict[str, Any]], tolerance_pp: float) -> list[str]:
    return [r for found in regressions_by_run(results, good, tolerance_pp).values() for r in found]


def _mark_regressions(results: dict[str, Any], found: dict[str, list[str]]) -> None:
    """Each run row carries its own regressions (the reports and the JUnit case show them)."""
    for dev in results.get("devices", []):
        for row in dev.get("runs", []):
            row["regressions"] = found.get(f"{dev['device']}/{row['id']}", [])


def run_nightly(specs: list[Path], targets: list[str], out_root: Path, history: Path, tolerance_pp: float,
                log: Callable[[str], None] = print, junit: Path | None = None,
                baselines: Path | None = BASELINES) -> dict[str, Any]:
    """Deploy each spec to each target; returns a summary with ``passed`` and per-pair outcomes.

    Each pair's folder (``out_root/<spec>/<target>``) gets results.json, report.md and
    report.html; ``junit`` gets one JUnit file over every pair. A pair with a pinned baseline
    (``baselines/<spec>/<target>.json``) is also compared with it (validate/baseline.py).
    """
    from pipeline.deploy import deploy
    from pipeline.validate.junit import write_junit
    from pipeline.validate.write import write_reports

    pairs, documents = [], []
    for spec_path in specs:
        spec = load_spec(spec_path)
        for target_name in targets:
            target = load_target(target_name)
            hist = history_file(history, spec.name, target.name)
            good = last_good(hist)
            log(f"nightly: {spec.name} on {target.name}")
            out_dir = contained(out_root / spec.name / target.name, out_root,
                                f"{spec.source_path}, {target.source_path}: field 'name'")
            try:
                results = deploy(spec, target, out_dir, log=log)
                error = None
            except EdgeshipError as exc:
                results, error = None, str(exc)
            # the metric every accuracy figure of the entry is in (`edgeship history` names its column by
            # it), from the spec: an entry whose deploy failed has no reference to read it from
            entry: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "spec": spec.name, "target": target.name, "metric": spec.evaluation.metric_name}
            if results is None:
                entry.update({"error": error, "devices": [], "gate": {"passed": False, "reasons": [error]}})
                regress: list[str] = []
            else:
                limit = target.limits.max_latency_regression_pct
                found = regressions_by_run(results, good, tolerance_pp, limit)
                pinned = read_baseline(baselines / spec.name / f"{target.name}.json") if baselines else None
                for key, why in (baseline_regressions(results, pinned, tolerance_pp=tolerance_pp,
                                                      max_latency_regression_pct=limit)
                                 if pinned else {}).items():
                    found.setdefault(key, []).extend(why)
                regress = [r for rs in found.values() for r in rs]
                _mark_regressions(results, found)
                entry.update({"release_id": results["release_id"], "reference": results["reference"],
                              "versions": results.get("versions"),  # edgeship, git commit, converters
                              # raw outputs stay in tonight's side file, not in the history
                              "devices": [{"device": d["device"], "gate": d["gate"],
                                           "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in d["runs"]],
                                           "probe": d.get("probe"), "conditions": d.get("conditions"),
                                           "error": d.get("error")} for d in results["devices"]],
                              "gate": results["gate"]})
            entry["regressions"] = regress
            entry["passed"] = bool(entry["gate"]["passed"]) and not regress
            hist.parent.mkdir(parents=True, exist_ok=True)
            with open(hist, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, default=str) + "\n")
            if results is not None:  # after the append: the trend in report.html includes tonight
                write_reports(results, out_dir, read_history(hist))
            documents.append(results if results is not None else entry)
            pairs.append({"spec": spec.name, "target": target.name, "passed": entry["passed"],
                          "reasons": entry["gate"]["reasons"] + regress, "history": str(hist)})
    if junit is not None:
        write_junit(junit, documents)
    return {"passed": all(p["passed"] for p in pairs) and bool(pairs), "pairs": pairs}
