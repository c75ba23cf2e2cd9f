"""Device agent entry point: ``python -m edgeship_agent <command> ...`` (prints one JSON document).

Commands:
  probe                      what the device is: arch, OS, CPU, memory, disk, python, runtimes
  run --release DIR          every run listed in DIR/manifest.json: first the artifacts built on
                             the device (device_build.py; cached, never timed), then each run in a
                             worker process of its own (its peak RSS is its own), timed in
                             interleaved rounds; prints {"device": ..., "results": [...]}
  doctor                     what the board has for TensorRT builds and real measurements:
                             TensorRT, CUDA driver, GPU, power sensor, clocks (one check a line)
  build --release DIR        only the device-side builds (fills the engine cache); prints
                             {"builds": {run id: block or {"error": reason}}}
  worker --release DIR --id RUN_ID   one run's worker, driven by ``run`` over stdin/stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import AGENT_VERSION
from .device_build import BuildFailed, Unavailable, host_name, prepare
from .probe import probe
from .rounds import measure_runs
from .runners import load_runner_module
from .worker import read_manifest, serve


def build_all(release: Path, runs: list[dict], threads: int) -> tuple[dict[str, dict], dict[str, str]]:
    """The device-side build of every run that has one, before any worker starts (so no build
    time is charged as load time). Returns (run id -> build block, run id -> failure reason)."""
    built: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for run in runs:
        if not run["config"].get("device_build"):
            continue
        try:
            built[run["id"]] = prepare(release / run["dir"], run["config"], load_runner_module(run["runner"]), threads)
        except (Unavailable, BuildFailed) as exc:
            failed[run["id"]] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken build fails its run, not the others
            failed[run["id"]] = f"device build on {host_name()} failed: {type(exc).__name__}: {exc}"
    return built, failed


def run_all(release: Path, only: list[str] | None, timeout_s: float) -> dict:
    """Build what is built on the device, then measure every listed run that has its artifact,
    each in a worker process of its own, timed in interleaved rounds."""
    manifest = read_manifest(release)
    runs = [r for r in manifest["runs"] if not only or r["id"] in only]
    built, unbuilt = build_all(release, runs, int(manifest["agent"]["threads"]))
    m, measured = measure_runs(release, [r for r in runs if r["id"] not in unbuilt], manifest["agent"], timeout_s)
    results = []
    for r in runs:
        res = measured.get(r["id"]) or _failed(r, unbuilt.get(r["id"]) or m.failed.get(r["id"], "the worker "
                                                                                        "returned no result"))
        if r["id"] in built:
            res["device_build"] = built[r["id"]]
        results.append(res)
    return {"agent_version": AGENT_VERSION, "release": manifest.get("release_id"),
            "device": probe(), "conditions": m.conditions, "results": results}


def build_only(release: Path, only: list[str] | None) -> dict:
    """``build``: the device-side builds alone (e.g. to fill the engine cache ahead of a deploy)."""
    manifest = read_manifest(release)
    runs = [r for r in manifest["runs"] if not only or r["id"] in only]
    built, failed = build_all(release, runs, int(manifest["agent"]["threads"]))
    return {"agent_version": AGENT_VERSION, "release": manifest.get("release_id"),
            "builds": {**built, **{rid: {"error": why} for rid, why in failed.items()}}}


def _failed(run: dict, why: str) -> dict:
    return {"id": run["id"], "backend": run["backend"], "precision": run["precision"], "error": why}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeship_agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    sub.add_parser("doctor")
    p_run = sub.add_parser("run")
    p_run.add_argument("--release", required=True)
    p_run.add_argument("--only", action="append")
    p_run.add_argument("--timeout", type=float, default=900.0)
    p_build = sub.add_parser("build")
    p_build.add_argument("--release", required=True)
    p_build.add_argument("--only", action="append")
    p_one = sub.add_parser("worker")
    p_one.add_argument("--release", required=True)
    p_one.add_argument("--id", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "probe":
        out = probe()
    elif args.cmd == "doctor":
        from .doctor import doctor

        out = doctor()
    elif args.cmd == "run":
        out = run_all(Path(args.release).resolve(), args.only, args.timeout)
    elif args.cmd == "build":
        out = build_only(Path(args.release).resolve(), args.only)
    else:
        return serve(Path(args.release).resolve(), args.id)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
