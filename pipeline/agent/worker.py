"""One run's persistent worker process on the device.

The worker loads its artifact once and then answers commands, one JSON line each way, so that the
parent (rounds.py) can time every run in interleaved rounds (A B C A B C ...) while each run keeps
a process of its own: its peak RSS is its own and a crash takes only that run down.

Commands: ``{"cmd": "warmup", "n": k}``, ``{"cmd": "time", "n": k}`` (raw timings, ms),
``{"cmd": "rss"}``, ``{"cmd": "evaluate"}`` (accuracy and fidelity on the shipped samples),
``{"cmd": "quit"}``. A reply with ``"error"`` means the worker is about to exit.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from .evaldata import PixelSamples
from .measure import KeepOutputs, evaluate, time_batch
from .runners import load_runner_module


def read_manifest(release: Path) -> dict:
    with open(release / "manifest.json", encoding="utf-8") as fh:
        return json.load(fh)


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 2)


class _Loaded:
    """The run's artifact activated, its memory-mapped evaluation data and one timing batch."""

    def __init__(self, release: Path, run_id: str) -> None:
        manifest = read_manifest(release)
        run = next((r for r in manifest["runs"] if r["id"] == run_id), None)
        if run is None:
            raise SystemExit(f"run {run_id!r} not in {release / 'manifest.json'}")
        self.cfg = manifest["agent"]
        data = release / self.cfg["eval_dir"]
        # Memory-mapped (pixels: decoded per batch): the evaluation set never sits in the process's
        # heap, so the peak RSS is the runtime's and the model's, not the data's.
        self.labels, self.reference = (
            np.load(data / f"{n}.npy", mmap_mode="r", allow_pickle=False) if (data / f"{n}.npy").is_file() else None
            for n in ("y", "reference"))
        self.x = _inputs(data, self.cfg.get("inputs"), self.cfg.get("pixels") or {})
        self.batch = int(self.cfg.get("batch", 1))
        self.first = ({k: np.array(v[:self.batch], dtype=np.float32) for k, v in self.x.items()}
                      if isinstance(self.x, dict) else np.array(self.x[:self.batch], dtype=np.float32))
        self.keep = keep_outputs(release, self.cfg.get("outputs"))
        self.baseline_rss_mb = _rss_mb()
        self.module = load_runner_module(run["runner"])
        self.runner = self.module.Runner(release / run["dir"], run["config"], int(self.cfg["threads"]))
        t0 = time.perf_counter()
        self.runner.activate()
        self.load_ms = round((time.perf_counter() - t0) * 1000.0, 3)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        what = cmd.get("cmd")
        if what == "warmup":
            time_batch(self.runner, self.first, int(cmd["n"]))
            return {"ok": True}
        if what == "time":
            return {"timings_ms": time_batch(self.runner, self.first, int(cmd["n"]))}
        if what == "rss":
            return {"peak_rss_mb": _rss_mb()}
        if what == "evaluate":
            return evaluate(self.runner, self.x, self.labels, self.reference, self.batch,
                            float(self.cfg.get("tie_margin", 0.0)), self.keep)
        return {"error": f"unknown command {what!r}"}


def keep_outputs(release: Path, block: dict[str, Any] | None) -> KeepOutputs | None:
    """The agent config's ``outputs`` block -> what ``evaluate`` returns of the raw outputs:
    ``{"float16": bool, "postprocess": {"file": "postprocess/m.py", "function": "f"}}`` (the
    postprocess module ships in the release, numpy only, and is loaded from its file)."""
    if not block:
        return None
    post = None
    if block.get("postprocess"):
        import importlib.util

        path = release / block["postprocess"]["file"]
        spec = importlib.util.spec_from_file_location(f"edgeship_postprocess_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the postprocess module {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        post = getattr(module, block["postprocess"]["function"])
    return KeepOutputs(bool(block.get("float16", False)), post)


def _inputs(data: Path, names: list[str] | None,
            pixels: dict[str, dict[str, Any]]) -> "np.ndarray | PixelSamples | dict[str, Any]":
    """The evaluation samples: one array (``x``) for a one-input model, else input name -> array
    (``x``, ``x_1``, ... in the order of the config's ``inputs``). A file named in the config's
    ``pixels`` is uint8 pixels (``.npz``), normalised per batch as it is read; any other is a
    float32 ``.npy``, memory-mapped."""
    def load(i: int) -> "np.ndarray | PixelSamples":
        stem = "x" if i == 0 else f"x_{i}"
        if stem in pixels:
            return PixelSamples(data / f"{stem}.npz", pixels[stem])
        return np.load(data / f"{stem}.npy", mmap_mode="r", allow_pickle=False)

    if not names or len(names) == 1:
        return load(0)
    return {name: load(i) for i, name in enumerate(names)}


def _send(channel: IO[str], doc: dict[str, Any]) -> None:
    channel.write(json.dumps(doc) + "\n")
    channel.flush()


def serve(release: Path, run_id: str) -> int:
    """Answer the parent's commands on stdin until ``quit``; replies go to the original stdout."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a runtime prints goes to stderr, never into the protocol
    try:
        loaded = _Loaded(release, run_id)
    except BaseException as exc:  # noqa: BLE001 - the parent gets the reason as data
        _send(channel, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(channel, {"ready": True, "load_ms": loaded.load_ms, "baseline_rss_mb": loaded.baseline_rss_mb,
                    "runtime_version": loaded.module.runtime_version()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                break
            reply = loaded.handle(cmd)
            _send(channel, reply)
            if "error" in reply:
                return 1
    except BaseException as exc:  # noqa: BLE001
        _send(channel, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        loaded.runner.deactivate()
    return 0
