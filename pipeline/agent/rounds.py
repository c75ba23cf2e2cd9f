"""Interleaved measurement of every run of a release (the parent side of worker.py).

Load that comes and goes on a shared device lands on whichever artifact is running, so timing
the artifacts one after the other made two deploys of the same EfficientNet-Lite0 artifacts show
ncnn int8 at 2.11x and then 1.00x fp32. Here every run gets a persistent worker process and the
timed runs are spread over ``rounds`` interleaved rounds (A B C, B C A, C A B, ...): a burst of
load is shared by all runs, so ratios within one deploy hold.

A run whose timings are unstable (coefficient of variation over ``max_cv``) is re-measured up to
``retry_unstable`` times, again interleaved with the other unstable runs.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .measure import coefficient_of_variation, summarize
from .observe import POWER_WINDOW_S, Observer, chunk_for
from .settle import settle

# One untimed inference before each round's chunk: switching processes evicts the caches, and the
# first inference after that would otherwise be charged to whichever run comes first.
CHUNK_WARMUP = 1


class WorkerFailed(Exception):
    """The worker of a run died, timed out or reported an error; the message is the reason."""


class Worker:
    """A run's worker process and the JSON-lines channel to it."""

    def __init__(self, release: Path, run: dict[str, Any], timeout_s: float) -> None:
        self.run, self.timeout_s = run, timeout_s
        self.stderr = tempfile.TemporaryFile()  # a pipe nobody reads could fill and block the worker
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __package__ or "edgeship_agent", "worker", "--release", str(release),
             "--id", run["id"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.ready = self._reply()

    def _reason(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return f"exit {code}: {tail[0]}"

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.proc.kill()
            raise WorkerFailed(f"timed out after {self.timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerFailed(self._reason())
        reply = json.loads(line)
        if "error" in reply:
            self._reason()
            raise WorkerFailed(str(reply["error"]))
        return reply

    def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(self._reason()) from None
        return self._reply()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # end of input: the worker deactivates its runner and exits
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def chunks(total: int, rounds: int) -> list[int]:
    """``total`` timed runs split over ``rounds`` rounds as evenly as possible (no empty round)."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


class Measurement:
    """The live workers of one agent run, the failures so far and each run's raw timings."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.failed: dict[str, str] = {}
        self.timings: dict[str, list[float]] = {}
        self.retries: dict[str, int] = {}
        self.conditions: dict[str, Any] = {}  # clocks and heat before and after the timed rounds
        self.settled_s: list[float] = []  # per chunk: the wait for the other runs' threads to go idle

    def settle(self) -> None:
        """Before a chunk: wait until no worker's threads are still spinning from their last one
        (settle.py: the previous run's spin would otherwise be charged to the next)."""
        self.settled_s.append(settle(w.proc.pid for w in self.workers.values()))

    def step(self, rid: str, action: Callable[[Worker], Any]) -> Any:
        """Run ``action`` on a live worker; a failure retires that run with its reason."""
        worker = self.workers.get(rid)
        if worker is None:
            return None
        try:
            return action(worker)
        except WorkerFailed as exc:
            self.failed[rid] = str(exc)
            worker.close()
            del self.workers[rid]
            return None

    def interleave(self, ids: list[str], total: int, rounds: int,
                   window: Callable[[str], Any] | None = None) -> dict[str, list[float]]:
        """``total`` timed runs of each of ``ids`` in interleaved rounds, the order rotated each round
        so every run takes every position. ``window(rid)``, when given, is a context manager around
        each timed chunk (power samples are attributed to the run that was running)."""
        got: dict[str, list[float]] = {rid: [] for rid in ids}
        for r, n in enumerate(chunks(total, rounds)):
            for rid in ids[r % len(ids):] + ids[:r % len(ids)] if ids else []:
                self.settle()

                def timed(w: Worker, n: int = n, rid: str = rid) -> None:
                    w.ask("warmup", n=CHUNK_WARMUP)
                    if window is None:
                        got[rid] += w.ask("time", n=n)["timings_ms"]
                    else:
                        with window(rid):
                            got[rid] += w.ask("time", n=n)["timings_ms"]
                self.step(rid, timed)
        return {rid: t for rid, t in got.items() if rid in self.workers}


def _unstable(timings: dict[str, list[float]], max_cv: float | None) -> list[str]:
    if max_cv is None:
        return []
    return [rid for rid, t in timings.items() if (coefficient_of_variation(t) or 0.0) > max_cv]


def _power_rounds(m: Measurement, obs: Observer, rounds: int) -> None:
    """Each live run's power window (at least ``POWER_WINDOW_S``), in interleaved rounds like the
    timing; a chunk's size comes from the run's own pace so far, and rounds go on (bounded) until
    every window is long enough."""
    rounds = max(1, rounds)
    for r in range(4 * rounds):
        ids = [rid for rid in m.workers if m.timings.get(rid) and obs.window_s(rid) < POWER_WINDOW_S]
        if not ids:
            return
        for rid in ids[r % len(ids):] + ids[:r % len(ids)]:
            left = POWER_WINDOW_S - obs.window_s(rid)
            n = chunk_for(obs.pace_ms(rid) or statistics.median(m.timings[rid]), left / max(1, rounds - r))
            m.settle()

            def sampled(w: Worker, rid: str = rid, n: int = n) -> None:
                with obs.span(rid, n):
                    w.ask("time", n=n)
            m.step(rid, sampled)


def measure_runs(release: Path, runs: list[dict[str, Any]], cfg: dict[str, Any], timeout_s: float,
                 window: Callable[[str], Any] | None = None) -> tuple[Measurement, dict[str, dict[str, Any]]]:
    """Start a worker per run, warm each, time all in interleaved rounds (re-measuring unstable
    ones), read the clocks and heat before and after, measure power where the board has a sensor,
    then take each one's peak RSS and evaluate it. Returns the measurement (``conditions``
    included) and per-run results for the runs that finished."""
    m = Measurement()
    obs = Observer()
    for run in runs:
        try:
            m.workers[run["id"]] = Worker(release, run, timeout_s)
        except WorkerFailed as exc:
            m.failed[run["id"]] = str(exc)
    warmup, total, rounds = int(cfg["warmup"]), int(cfg["runs"]), int(cfg.get("rounds", 1))
    for rid in list(m.workers):
        m.step(rid, lambda w: w.ask("warmup", n=warmup) if warmup else None)
    m.timings = m.interleave(list(m.workers), total, rounds, window)
    for _ in range(int(cfg.get("retry_unstable", 0))):
        again = _unstable(m.timings, cfg.get("max_cv"))
        if not again:
            break
        for rid, t in m.interleave(again, total, rounds, window).items():
            m.timings[rid] = t
            m.retries[rid] = m.retries.get(rid, 0) + 1
    obs.timed_done()
    with obs.power_phase() as measuring:
        if measuring:
            _power_rounds(m, obs, rounds)
    m.conditions = {**obs.conditions(), "settle_ms": _settle_summary(m.settled_s)}
    results = {}
    for rid in list(m.workers):
        rss = m.step(rid, lambda w: w.ask("rss"))
        metrics = m.step(rid, lambda w: w.ask("evaluate"))
        if rss is None or metrics is None or rid not in m.timings:
            continue
        results[rid] = _result(m, rid, rss, metrics, warmup, rounds, cfg.get("max_cv"), m.conditions["flags"])
        results[rid]["power"] = obs.power(rid)
    for worker in m.workers.values():
        worker.close()
    return m, results


def _settle_summary(waits: list[float]) -> dict[str, Any]:
    """The waits before the chunks: their number, median and longest, in ms."""
    ms = sorted(w * 1e3 for w in waits)
    return {"n": len(ms), "median": round(statistics.median(ms), 1) if ms else None,
            "max": round(ms[-1], 1) if ms else None}


# Conditions under which no run's timings are to be trusted, whatever their spread.
UNSTABLE_CONDITIONS = ("load above cores", "throttled", "powersave governor")


def _result(m: Measurement, rid: str, rss: dict[str, Any], metrics: dict[str, Any], warmup: int,
            rounds: int, max_cv: float | None, flags: list[str]) -> dict[str, Any]:
    w = m.workers[rid]
    times = m.timings[rid]
    latency = summarize(times, warmup)
    latency["rounds"] = len(chunks(len(times), rounds))
    latency["retries"] = m.retries.get(rid, 0)
    why = [f for f in flags if f in UNSTABLE_CONDITIONS]
    if max_cv is not None and latency["cv"] is not None and latency["cv"] > max_cv:
        why.insert(0, f"CV {latency['cv']:.2f} > {max_cv:g}")
    latency["unstable"] = bool(why)
    latency["unstable_why"] = why
    return {"id": rid, "backend": w.run["backend"], "precision": w.run["precision"],
            "runtime_version": w.ready.get("runtime_version"), "load_ms": w.ready.get("load_ms"),
            **metrics, "latency_ms": latency, "timings_ms": [round(t, 4) for t in times],
            "peak_rss_mb": rss["peak_rss_mb"], "baseline_rss_mb": w.ready.get("baseline_rss_mb"), "error": None}
