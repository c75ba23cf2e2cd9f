"""The nightly's trend: accuracy and p50 over time per device x backend x precision, from the history.

The history is ``<history>/<spec>/<target>.jsonl``, one nightly entry a line (pipeline/nightly.py);
report.html plots these series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.validate.report import metric_label

# (device/run id) -> [(when, accuracy, p50 ms, passed), ...] oldest first
Series = dict[str, list[tuple[str, float | None, float | None, bool]]]


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every entry of a history file, oldest first (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(entries: list[dict[str, Any]]) -> Series:
    out: Series = {}
    for entry in entries:
        for dev in entry.get("devices", []):
            for row in dev.get("runs", []):
                p50 = (row.get("latency_ms") or {}).get("p50")
                passed = bool((row.get("gate") or {}).get("passed")) and not row.get("regressions")
                out.setdefault(f"{dev['device']}/{row['id']}", []).append(
                    (str(entry.get("when")), row.get("accuracy"), p50, passed))
    return out


# the value column is named for the entries' metric (history_columns); the others are fixed
HISTORY_COLUMNS = ("night", "run", "accuracy %", "p50 ms", "verdict")
HISTORY_TEXT_COLUMNS = ("night", "run", "verdict")


def entry_metric(entry: dict[str, Any]) -> str | None:
    """The metric a nightly entry's accuracy figures are in (pipeline/nightly.py records it; an
    entry from before that knows it only through its reference, an older one not at all)."""
    return entry.get("metric") or (entry.get("reference") or {}).get("metric")


def _value_label(metric: str | None) -> str:
    return metric_label({"reference": {"metric": metric}})


def history_columns(entries: list[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`HISTORY_COLUMNS` with the value column named for the metric every entry that records
    one is in ('accuracy %' when none does; 'metric' when they differ: each cell then names its own)."""
    metrics = {m for m in map(entry_metric, entries) if m}
    label = _value_label(next(iter(metrics))) if len(metrics) == 1 else "metric" if metrics else _value_label(None)
    return tuple(label if c == "accuracy %" else c for c in HISTORY_COLUMNS)


def history_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """One row per night and run, oldest first: what ``edgeship history`` prints (the value's
    metric beside it when the entries hold more than one)."""
    mixed = len({m for m in map(entry_metric, entries) if m}) > 1
    out = []
    for entry in entries:
        if "accepted" in entry:  # `edgeship history --accept`: its runs of that night are good from now on
            acc = entry["accepted"]
            out += [[acc["night"], key, "-", "-", f"accepted {entry['when']}: {acc['reason']}"] for key in acc["runs"]]
            continue
        suffix = f" {_value_label(entry_metric(entry))}" if mixed else ""
        for key, points in series([entry]).items():
            for when, acc, p50, ok in points:
                out.append([when, key, "-" if acc is None else f"{acc:.2f}{suffix}",
                            "-" if p50 is None else f"{p50:.3f}", "pass" if ok else "FAIL"])
    return sorted(out, key=lambda r: (r[0], r[1]))
