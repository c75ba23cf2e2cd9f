"""Device agent entry point: ``python -m edgeship_agent <command> ...`` (prints one JSON document).

Commands:
  probe                      what the device is: arch, OS, CPU, memory, disk, python, runtimes
  run --release DIR          every run listed in DIR/manifest.json, each in a worker process of
                             its own (its peak RSS is its own), timed in interleaved rounds;
                             prints {"device": ..., "results": [...]}
  worker --release DIR --id RUN_ID   one run's worker, driven by ``run`` over stdin/stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import AGENT_VERSION
from .probe import probe
from .rounds import measure_runs
from .worker import read_manifest, serve


def run_all(release: Path, only: list[str] | None, timeout_s: float) -> dict:
    """Measure every listed run, each in a worker process of its own, timed in interleaved rounds."""
    manifest = read_manifest(release)
    runs = [r for r in manifest["runs"] if not only or r["id"] in only]
    m, measured = measure_runs(release, runs, manifest["agent"], timeout_s)
    results = [measured.get(r["id"]) or _failed(r, m.failed.get(r["id"], "the worker returned no result"))
               for r in runs]
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
    p_one = sub.add_parser("worker")
    p_one.add_argument("--release", required=True)
    p_one.add_argument("--id", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "probe":
        out = probe()
    elif args.cmd == "run":
        out = run_all(Path(args.release).resolve(), args.only, args.timeout)
    else:
        return serve(Path(args.release).resolve(), args.id)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
