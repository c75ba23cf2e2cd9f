"""What the device was doing while it was measured: clocks and heat before and after the timed
rounds, and each run's power from the board's own sensor (sensors.py).

Power needs a window long enough for the sensor to see it (an INA3221 or RAPL reading every 50 ms
sees nothing of a 0.06 ms inference), so with a sensor present every run gets a power phase after
its timed rounds: inferences in interleaved rounds until its window reaches ``POWER_WINDOW_S``,
the samples taken inside its own spans attributed to it, the idle baseline taken just before.
Without a sensor there is no power phase and ``power`` is null (the host labels its estimate).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .sensors import (PowerSampler, PowerSensor, SensorReadError, condition_flags, find_power_sensor,
                      idle_baseline, power_summary, read_conditions)

# decisions.md: timed runs repeat until the window is >= 2 s so sub-millisecond models are measurable.
POWER_WINDOW_S = 2.0
IDLE_S = 1.0
# Where the agent reads sysfs and procfs (default "/"); a board whose /sys is mounted elsewhere,
# or a test's fixture tree, sets it.
ROOT_ENV = "EDGESHIP_SENSORS_ROOT"


def sensors_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or "/")


class Observer:
    """Conditions around the timed rounds and the power phase's sampler, spans and results."""

    def __init__(self) -> None:
        self.root = sensors_root()
        self.before = read_conditions(self.root)
        self.after: Dict[str, Any] = {}
        found = find_power_sensor(self.root)
        self.sensor: Optional[PowerSensor] = found if isinstance(found, PowerSensor) else None
        self.sensor_error: Optional[Dict[str, str]] = found if isinstance(found, dict) else None
        self.idle_w: Optional[float] = None
        self.sampler: Optional[PowerSampler] = None
        self.spans: Dict[str, List[Tuple[float, float, int]]] = {}

    def timed_done(self) -> None:
        """The timed rounds are over: the clocks and heat they left behind."""
        self.after = read_conditions(self.root)

    def conditions(self) -> Dict[str, Any]:
        return {"before": self.before, "after": self.after, "flags": condition_flags(self.before, self.after)}

    @contextlib.contextmanager
    def power_phase(self) -> Iterator[bool]:
        """Idle baseline, then the sampler running; yields whether power is being measured."""
        if self.sensor is None:
            yield False
            return
        try:
            self.idle_w = idle_baseline(self.sensor, IDLE_S)
        except SensorReadError as exc:
            self.sensor_error, self.sensor = exc.result, None
            yield False
            return
        try:
            with PowerSampler(self.sensor) as sampler:
                self.sampler = sampler
                yield True
        finally:
            self.sensor.close()

    @contextlib.contextmanager
    def span(self, rid: str, inferences: int) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.spans.setdefault(rid, []).append((t0, time.monotonic(), inferences))

    def window_s(self, rid: str) -> float:
        return sum(t1 - t0 for t0, t1, _ in self.spans.get(rid, []))

    def pace_ms(self, rid: str) -> Optional[float]:
        """Milliseconds per inference in this run's power spans so far (None before the first)."""
        n = sum(k for _, _, k in self.spans.get(rid, []))
        return self.window_s(rid) * 1000.0 / n if n else None

    def power(self, rid: str) -> Optional[Dict[str, Any]]:
        """results.json's ``power`` of one run: its own spans' samples net of the idle baseline."""
        if self.sensor_error is not None:
            return dict(self.sensor_error)
        if self.sampler is None or not self.spans.get(rid):
            return None
        if self.sampler.error is not None:
            return {"sensor": self.sampler.sensor.name, "error": self.sampler.error}
        samples = [w for t0, t1, _ in self.spans[rid] for w in self.sampler.watts_between(t0, t1)]
        inferences = sum(n for _, _, n in self.spans[rid])
        return power_summary(self.sampler.sensor.name, samples, self.window_s(rid), self.idle_w, inferences)


def chunk_for(p50_ms: float, seconds: float) -> int:
    """Inferences of one batch that take about ``seconds`` at ``p50_ms`` each (at least one)."""
    return max(1, int(math.ceil(seconds * 1000.0 / max(p50_ms, 1e-3))))
