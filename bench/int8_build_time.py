"""Int8 build time per backend: the ``<backend> int8`` stage of a cold build, nothing else.

Not a timed test (the machine is shared; a wall time is a measurement, not a pass/fail): each
backend builds the workload's int8 artifact once with an empty cache (cold statistics) and once
more with only the convert stage dropped from the cache (statistics cached), and the two stage
times are printed. Usage::

    .venv/bin/python bench/int8_build_time.py [--workload mnist|efficientnet-lite0] [--backends ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.build import build  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.registry import BACKENDS, get_backend  # noqa: E402
from pipeline.spec import BuildSpec, load_spec, load_target  # noqa: E402

WORKLOADS = {"mnist": ROOT / "examples" / "mnist.yaml", "efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0.yaml"}


def stage_seconds(spec, backend: str, tmp: Path, cache: Cache) -> float:
    """Seconds of the ``<backend> int8`` stage of one build into ``tmp``."""
    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend=backend, precisions=["int8"])]
    result = build(spec, target, tmp, cache=cache, log=lambda s: None)
    return next(e.seconds for e in result.events if e.stage == f"{backend} int8")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="mnist", choices=sorted(WORKLOADS))
    parser.add_argument("--backends", nargs="*", default=[b for b in BACKENDS if get_backend(b).available()[0]])
    args = parser.parse_args()
    spec = load_spec(WORKLOADS[args.workload])
    rows = {}
    for backend in args.backends:
        tmp = Path(tempfile.mkdtemp(prefix=f"edgeship-int8-{backend}-"))
        try:
            cache = Cache(tmp / "cache" / "stages")
            cold = stage_seconds(spec, backend, tmp / "a", cache)
            shutil.rmtree(cache.root / "convert", ignore_errors=True)  # keep statistics, rebuild the artifact
            warm = stage_seconds(spec, backend, tmp / "b", cache)
            rows[backend] = {"cold_s": round(cold, 2), "stats_cached_s": round(warm, 2)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{args.workload} {backend} int8: cold {rows[backend]['cold_s']:.2f} s, "
              f"statistics cached {rows[backend]['stats_cached_s']:.2f} s", flush=True)
    print(json.dumps({"workload": args.workload, "int8_build_s": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
