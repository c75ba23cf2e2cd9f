"""Ship what passed: which of the runs that passed the gate a release recommends.

``deploy.recommend`` in the spec picks by one figure: ``fastest`` (lowest latency p90),
``smallest`` (fewest artifact bytes) or ``most-accurate`` (highest accuracy, i.e. least drop).
Ties go to the next figure (p90, then size), so the choice is deterministic. Only runs within
every limit (their gate passed) are candidates; with none, nothing is recommended.
"""

from __future__ import annotations

import math
from typing import Any

POLICIES = ("fastest", "smallest", "most-accurate")


def _num(value: Any, sign: float = 1.0) -> float:
    """A figure to sort by; a missing one sorts last."""
    return sign * float(value) if isinstance(value, (int, float)) else math.inf


def _key(policy: str, row: dict[str, Any]) -> tuple[float, float, float]:
    p90 = _num((row.get("latency_ms") or {}).get("p90"))
    size = _num(row.get("artifact_bytes"))
    accuracy = _num(row.get("accuracy"), -1.0)
    if policy == "smallest":
        return size, p90, accuracy
    if policy == "most-accurate":
        return accuracy, p90, size
    return p90, size, accuracy


def recommend(rows: list[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    """The run ``policy`` chooses among ``rows`` whose gate passed (None when none passed)."""
    if policy not in POLICIES:
        raise ValueError(f"deploy.recommend must be one of {', '.join(POLICIES)}, not {policy!r}")
    passed = [r for r in rows if (r.get("gate") or {}).get("passed")]
    if not passed:
        return None
    best = min(passed, key=lambda r: _key(policy, r))
    return {"run": best["id"], "backend": best.get("backend"), "precision": best.get("precision"),
            "policy": policy, "p90_ms": (best.get("latency_ms") or {}).get("p90"),
            "artifact_bytes": best.get("artifact_bytes"), "accuracy": best.get("accuracy")}


def recommend_across(devices: list[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    """For a fleet: among runs that passed on every measured device, judged by their worst device
    (highest p90, lowest accuracy). One device: that device's own recommendation."""
    measured = [d for d in devices if d.get("runs")]
    if not measured or len(measured) < len(devices):
        return None  # a device that was not measured cannot vouch for any run
    merged: list[dict[str, Any]] = []
    for row in measured[0]["runs"]:
        same = [next((r for r in d["runs"] if r["id"] == row["id"]), None) for d in measured]
        if any(r is None or not (r.get("gate") or {}).get("passed") for r in same):
            continue
        p90s = [(r.get("latency_ms") or {}).get("p90") for r in same]  # type: ignore[union-attr]
        accs = [r.get("accuracy") for r in same]  # type: ignore[union-attr]
        merged.append({**row, "gate": {"passed": True},
                       "latency_ms": {"p90": max(p90s) if None not in p90s else None},
                       "accuracy": min(accs) if None not in accs else None})
    return recommend(merged, policy)
