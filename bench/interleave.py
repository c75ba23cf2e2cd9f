"""In-process interleaved timing for the benches (one implementation for all of them).

Every variant is timed in each round, in a rotated order (A B C, B C A, ...), so load that
comes and goes lands on all of them. Before each chunk the process waits until the previous
variant's threads stop spinning (``pipeline.agent.settle``: ONNX Runtime's pool spins ~40 ms
after a run, which the next variant would otherwise pay), then runs one untimed call for the
caches the switch evicted.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from pipeline.agent.settle import settle


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int, per_round: int,
                warmup: int = 5) -> dict[str, list[list[float]]]:
    """ms per call, per variant and round: ``{name: [[round 0 chunk], [round 1 chunk], ...]}``."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            settle([os.getpid()])
            calls[name]()  # untimed: the caches after switching variants
            chunk = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                calls[name]()
                chunk.append((time.perf_counter() - t0) * 1e3)
            times[name].append(chunk)
    return times
