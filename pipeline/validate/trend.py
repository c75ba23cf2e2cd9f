"""The nightly's trend: accuracy and p50 over time per device x backend x precision, from the history.

The history is ``<history>/<spec>/<target>.jsonl``, one nightly entry a line (pipeline/nightly.py);
report.html plots these series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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



HISTORY_COLUMNS = ("night", "run", "accuracy %", "p50 ms", "verdict")


def history_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """One row per night and run, oldest first: what ``edgeship history`` prints."""
    out = []
    for key, points in sorted(series(entries).items()):
        for when, acc, p50, ok in points:
            out.append([when, key, "-" if acc is None else f"{acc:.2f}", "-" if p50 is None else f"{p50:.3f}",
                        "pass" if ok else "FAIL"])
    return sorted(out, key=lambda r: (r[0], r[1]))
