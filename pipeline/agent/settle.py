"""Wait for other runtimes' idle threads to stop spinning before a timed chunk.

Runtimes keep their pool threads spinning after an inference so that the next one starts at
once: ONNX Runtime's intra-op pool thread burns ~40 ms of CPU after each ``Run`` (measured on a
2-core x86 host, ``allow_spinning`` on, its default), OpenMP builds (ncnn) spin for their block
time. Timing artifacts side by side means switching from one to the next, and on a board with as
many cores as inference threads the previous artifact's spinning thread then takes a core from the
next one: EfficientNet-Lite0's ORT int8 chunk (12 runs, ~28 ms) ran entirely in the fp32 session's
spin and read 6.9 ms p50 instead of 2.3 ms (a quarter of its runs twice as slow, in one process);
the faster artifact is always the one hurt, so every int8/fp32 ratio came out low.

``settle`` watches the processes' CPU time (``/proc/<pid>/stat``, every thread counted) and returns
once one window passes with none used, which is the state a deployed model starts an inference in
when nothing else runs. Stdlib only: this ships to the device with the agent.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Optional

STEP_S = 0.03  # one window: three scheduler ticks at 100 Hz, so a spinning thread always shows
CAP_S = 1.0  # a process that never goes quiet (a real neighbour) is not waited for longer
NO_PROC_S = 0.1  # without /proc: a fixed pause longer than ONNX Runtime's measured spin


def cpu_ticks(pid: int) -> Optional[int]:
    """User + system CPU time of every thread of ``pid`` in clock ticks; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return int(fields[11]) + int(fields[12])  # utime, stime: stat fields 14 and 15


def settle(pids: Iterable[int], step_s: float = STEP_S, cap_s: float = CAP_S) -> float:
    """Sleep until none of ``pids`` uses CPU over one ``step_s`` window (a pid that is gone counts
    as quiet); the seconds waited, ``cap_s`` at most. The caller's own process may be among
    ``pids``: its sleeping thread uses nothing, so what shows is its other threads."""
    pids = list(pids)
    if not os.path.isdir("/proc/self"):
        time.sleep(NO_PROC_S)
        return NO_PROC_S
    t0 = time.monotonic()
    last = [cpu_ticks(p) for p in pids]
    while time.monotonic() - t0 < cap_s:
        time.sleep(step_s)
        now = [cpu_ticks(p) for p in pids]
        if all(a is None or b is None or a == b for a, b in zip(last, now)):
            break
        last = now
    return time.monotonic() - t0
