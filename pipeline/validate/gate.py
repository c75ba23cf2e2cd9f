"""The gate: each run against the accuracy budget and the target's limits.

The budget is the tighter of the spec's ``accuracy.max_drop_pp`` and the target's
``limits.max_accuracy_drop_pp``. ``accuracy.decision`` says what is held to it: ``point`` the
measured drop, ``upper_bound`` the upper end of the run's paired 95 % ``accuracy_drop_interval``
(a straddling interval fails as inconclusive, with about how many samples would settle it). The drop is measured against the fp32 reference computed on the
host from the optimized ONNX model, so an fp32 conversion error on a backend shows up as a drop
too. For the ``fidelity`` metric the run's "accuracy" is its top-1 agreement with that reference.
"""

from __future__ import annotations

from typing import Any

from calibration.search import summary
from pipeline.metrics import drop_pp
from pipeline.spec import PipelineSpec, TargetSpec
from pipeline.validate.stats import CONFIDENCE, Interval, budget_verdict
from pipeline.validate.timings import latency_block


def budget_pp(spec: PipelineSpec, target: TargetSpec) -> float:
    """The one budget rule: the INT8 search (pipeline.backends.calibrate) and the gate use it."""
    budget = spec.accuracy.max_drop_pp
    if target.limits.max_accuracy_drop_pp is not None:
        budget = min(budget, target.limits.max_accuracy_drop_pp)
    return budget


def run_row(raw: dict[str, Any], run_meta: dict[str, Any], reference: dict[str, Any], metric: str,
            tdp_w: float | None) -> dict[str, Any]:
    """One result row (the README's results schema) from the agent's raw result."""
    # fidelity with a tie margin: gated on agreement within ties; strict agreement still reported
    accuracy = raw.get("accuracy") if metric == "top1" else raw.get("agreement_within_ties", raw.get("top1_agreement"))
    drop = None if accuracy is None else drop_pp(bool(reference.get("higher_is_better", True)), reference["accuracy"],
                                                 accuracy)
    latency = latency_block(raw)
    row = {
        "id": run_meta["id"],
        "backend": run_meta["backend"],
        "precision": run_meta["precision"],
        "batch": run_meta.get("batch"),  # samples per timed call (the spec's input batch)
        "accuracy": accuracy,
        "accuracy_drop_pp": drop,
        "top1_agreement": raw.get("top1_agreement"),
        "agreement_within_ties": raw.get("agreement_within_ties"),
        "sqnr_db": raw.get("sqnr_db"),
        "latency_ms": latency,
        "timings_ms": raw.get("timings_ms"),  # raw; written to the timings side file, not results.json
        "peak_rss_mb": raw.get("peak_rss_mb"),
        "model_rss_mb": (round(raw["peak_rss_mb"] - raw["baseline_rss_mb"], 2)
                         if raw.get("peak_rss_mb") is not None and raw.get("baseline_rss_mb") is not None else None),
        "load_ms": raw.get("load_ms"),
        "artifact_bytes": run_meta.get("artifact_bytes"),
        "artifact_sha256": run_meta.get("artifact_sha256"),
        "runtime_version": raw.get("runtime_version"),
        # The board's own sensor where it has one (power: {sensor, mean_w, ...} or {sensor, error});
        # with no sensor (power null) energy is estimated from the board's typical power and the
        # measured latency, and labelled as an estimate.
        "power": raw.get("power"),
        "energy_mj_per_inference_est": (round(tdp_w * latency["p50"], 4)
                                        if tdp_w and latency.get("p50") and not raw.get("power") else None),
        "calibration": _calibration_summary(run_meta),
        # int8 builds: how many compute ops run in int8, which stay float (pipeline.backends.coverage)
        "int8_coverage": (run_meta.get("conversion") or {}).get("int8_coverage"),
        "device_build": raw.get("device_build"),  # built on the device: cached?, time, log, layer precisions
        "error": raw.get("error"),
    }
    return row


WORST_TENSORS = 5


def _calibration_summary(run_meta: dict[str, Any]) -> dict[str, Any] | None:
    """The results.json block of the build's one INT8 report (``calibration.search.SearchReport``)."""
    cal = (run_meta.get("conversion") or {}).get("calibration")
    if not cal:
        return None
    out = summary(cal)
    table = cal.get("per_layer_sqnr") or []
    if table:  # where the int8 error enters: the tensors with the lowest SQNR vs fp32 (holdout)
        out["worst_tensors"] = sorted(table, key=lambda r: float(r["sqnr_db"]))[:WORST_TENSORS]
    return out


def accuracy_reason(row: dict[str, Any], budget: float, decision: str) -> str | None:
    """Why the run's accuracy fails the budget under the spec's ``accuracy.decision``, or None."""
    rid, drop = row["id"], row.get("accuracy_drop_pp")
    if drop is None:
        return f"{rid}: no accuracy was measured"
    if decision == "upper_bound":
        return _upper_bound_reason(rid, row.get("accuracy_drop_interval"), budget)
    return f"{rid}: accuracy drop {drop:.2f} pp exceeds the budget {budget:.2f} pp" if drop > budget else None


def _upper_bound_reason(rid: str, interval: Interval | None, budget: float) -> str | None:
    """``upper_bound``: only a drop whose whole 95 % interval is within the budget passes."""
    if not interval:
        # Without the interval the upper end is unknown, so it cannot be shown to be within the budget.
        return (f"{rid}: accuracy.decision upper_bound needs the drop's interval, and there is none "
                "(the per-sample outcomes could not be paired with fp32 on the host)")
    verdict = budget_verdict(interval, budget)
    drop = float(interval["drop_pp"])  # type: ignore[arg-type]
    if verdict["verdict"] == "pass":
        return None
    if verdict["verdict"] == "fail":
        low, high = float(interval["low_pp"]), float(interval["high_pp"])  # type: ignore[arg-type]
        conf = float(interval.get("confidence") or CONFIDENCE)  # type: ignore[arg-type]
        return (f"{rid}: accuracy drop {drop:.2f} pp exceeds the budget {budget:.2f} pp with all of its "
                f"{conf:.0%} interval [{low:.2f}, {high:.2f}] pp (n={interval['n']})")
    return f"{rid}: accuracy drop {drop:.2f} pp, {verdict['message']}"


def check_run(row: dict[str, Any], spec: PipelineSpec, target: TargetSpec) -> dict[str, Any]:
    """Gate one run; returns {"passed": bool, "reasons": [...]} and stores it in the row."""
    reasons: list[str] = []
    rid = row["id"]
    if row.get("error"):
        reasons.append(f"{rid}: failed on the device: {row['error']}")
    else:
        budget = budget_pp(spec, target)
        accuracy = accuracy_reason(row, budget, spec.accuracy.decision)
        if accuracy:
            reasons.append(accuracy)
        lim = target.limits
        p90 = (row.get("latency_ms") or {}).get("p90")
        if lim.max_latency_p90_ms is not None and p90 is not None and p90 > lim.max_latency_p90_ms:
            reasons.append(f"{rid}: latency p90 {p90:.2f} ms exceeds {lim.max_latency_p90_ms} ms")
        rss = row.get("peak_rss_mb")
        if lim.max_memory_mb is not None and rss is not None and rss > lim.max_memory_mb:
            reasons.append(f"{rid}: peak memory {rss:.1f} MB exceeds {lim.max_memory_mb} MB")
        size = row.get("artifact_bytes")
        if lim.max_artifact_mb is not None and size is not None and size / 2**20 > lim.max_artifact_mb:
            reasons.append(f"{rid}: artifact {size / 2**20:.2f} MB exceeds {lim.max_artifact_mb} MB")
        cal = row.get("calibration") or {}
        if cal.get("budget_met") is False:
            reasons.append(f"{rid}: calibration could not meet the {budget:.2f} pp budget even with "
                           "layers kept in float")
    gate = {"passed": not reasons, "reasons": reasons}
    row["gate"] = gate
    return gate


def combine(gates: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = [r for g in gates for r in g["reasons"]]
    return {"passed": all(g["passed"] for g in gates) and bool(gates), "reasons": reasons or
            ([] if gates else ["nothing was measured"])}
