"""Device agent entry point: ``python -m edgeship_agent <command> ...`` (prints one JSON document).

Commands:
  probe                      what the device is: arch, OS, CPU, memory, disk, python, runtimes
  run --release DIR          every run listed in DIR/manifest.json, each in a child process so
                             its peak RSS is its own; prints {"device": ..., "results": [...]}
  run-one --release DIR --id RUN_ID   one run in this process (used by ``run``)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import AGENT_VERSION
from .measure import evaluate, time_runs
from .probe import probe


def _manifest(release: Path) -> dict:
    with open(release / "manifest.json", encoding="utf-8") as fh:
        return json.load(fh)


def run_one(release: Path, run_id: str) -> dict:
    """Load one artifact, evaluate it on the shipped samples and time it. Returns a result dict."""
    import resource

    import numpy as np

    from .runners import load_runner_module

    manifest = _manifest(release)
    run = next((r for r in manifest["runs"] if r["id"] == run_id), None)
    if run is None:
        raise SystemExit(f"run {run_id!r} not in {release / 'manifest.json'}")
    agent_cfg = manifest["agent"]
    data = release / agent_cfg["eval_dir"]

    def load(name: str) -> "np.ndarray | None":
        # Memory-mapped: the evaluation set never sits in the process's heap, so the peak RSS
        # below is the runtime's and the model's, not the data's.
        path = data / f"{name}.npy"
        return np.load(path, mmap_mode="r", allow_pickle=False) if path.is_file() else None

    x, labels, reference = load("x"), load("y"), load("reference")
    batch = int(agent_cfg.get("batch", 1))
    first = np.array(x[:batch], dtype=np.float32)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    module = load_runner_module(run["runner"])
    runner = module.Runner(release / run["dir"], run["config"], int(agent_cfg["threads"]))
    t0 = time.perf_counter()
    runner.activate()
    load_ms = (time.perf_counter() - t0) * 1000.0
    try:
        # Latency (and the memory high-water mark) first, on one batch; accuracy after, streaming
        # the memory-mapped samples (their pages are file-backed and reclaimable).
        latency = time_runs(runner, first, int(agent_cfg["warmup"]), int(agent_cfg["runs"]))
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics = evaluate(runner, x, labels, reference, batch, float(agent_cfg.get("tie_margin", 0.0)))
    finally:
        runner.deactivate()
    return {
        "id": run_id,
        "backend": run["backend"],
        "precision": run["precision"],
        "runtime_version": module.runtime_version(),
        "load_ms": round(load_ms, 3),
        **metrics,
        "latency_ms": latency,
        "peak_rss_mb": round(peak_kb / 1024.0, 2),
        "baseline_rss_mb": round(rss_before_kb / 1024.0, 2),
        "error": None,
    }


def run_all(release: Path, only: list[str] | None, timeout_s: float) -> dict:
    """Run each listed run in its own child process (isolated memory, crash containment)."""
    manifest = _manifest(release)
    results = []
    for run in manifest["runs"]:
        if only and run["id"] not in only:
            continue
        cmd = [sys.executable, "-m", __package__ or "edgeship_agent", "run-one",
               "--release", str(release), "--id", run["id"]]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            results.append(_failed(run, f"timed out after {timeout_s:.0f} s"))
            continue
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results.append(_failed(run, f"exit {proc.returncode}: {tail[0]}"))
            continue
        results.append(json.loads(proc.stdout))
    return {"agent_version": AGENT_VERSION, "release": manifest.get("release_id"),
            "device": probe(), "results": results}


def _failed(run: dict, why: str) -> dict:
    return {"id": run["id"], "backend": run["backend"], "precision": run["precision"], "error": why}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeship_agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    p_run = sub.add_parser("run")
    p_run.add_argument("--release", required=True)
    p_run.add_argument("--only", action="append")
    p_run.add_argument("--timeout", type=float, default=900.0)
    p_one = sub.add_parser("run-one")
    p_one.add_argument("--release", required=True)
    p_one.add_argument("--id", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "probe":
        out = probe()
    elif args.cmd == "run":
        out = run_all(Path(args.release).resolve(), args.only, args.timeout)
    else:
        out = run_one(Path(args.release).resolve(), args.id)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
