"""Raw per-run timings: the p50 interval from them, and their side file beside results.json.

The agent returns every timed run's latency (``timings_ms`` on each run row). They feed the p50
bootstrap interval, the latency plots and the baseline's Mann-Whitney test, but they are large,
so results.json names a side file (``timings_file``, an .npz keyed ``<device>/<run id>``) instead
of carrying them (shared/decisions.md: large arrays live in side files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.validate.sidefiles import Side, keyed_rows
from pipeline.validate.stats import p50_interval

TIMINGS_FILE = "timings.npz"
__all__ = ["TIMINGS", "TIMINGS_FILE", "keyed_rows", "latency_block", "row_timings", "unstable"]


def latency_block(raw: dict[str, Any]) -> dict[str, Any]:
    """The agent's latency summary, plus the p50's 95 % bootstrap interval from the raw timings."""
    latency = dict(raw.get("latency_ms") or {})
    times = raw.get("timings_ms")
    if times:
        _, low, high = p50_interval(times)
        latency["p50_low"], latency["p50_high"] = round(low, 4), round(high, 4)
    return latency


TIMINGS = Side("timings_ms", "timings_file", TIMINGS_FILE, lambda t: {"": np.asarray(t, dtype=np.float64)})


def row_timings(results: dict[str, Any], folder: Path | None) -> dict[str, np.ndarray]:
    """``<device>/<run id>`` -> raw timings: from the rows while in memory, else from the side file."""
    found = {key: np.asarray(row["timings_ms"], dtype=np.float64) for key, row in keyed_rows(results)
             if row.get("timings_ms")}
    name = results.get("timings_file")
    if found or folder is None or not name or not (folder / name).is_file():
        return found
    with np.load(folder / name, allow_pickle=False) as data:
        return {key: np.asarray(data[key], dtype=np.float64) for key in data.files}


def unstable(row: dict[str, Any]) -> bool:
    """Whether a run's (or a pinned baseline run's) timings were flagged unstable: its spread over
    validation.max_cv or the device under load, throttled or on the powersave governor. Such
    timings say how busy the machine was, not how fast the model is, so the nightly compares no
    latency across nights with them (the flag itself is in the table and the reports)."""
    return bool((row.get("latency_ms") or {}).get("unstable") or row.get("unstable"))

