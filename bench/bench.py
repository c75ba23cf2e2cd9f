"""`make bench`: fp32 vs fp16 vs int8, every available backend, both reference workloads.

Everything runs in one go on this machine through the real pipeline (a cold build with a stage
cache of its own -> local device -> the agent). The agent times every artifact in ROUNDS
interleaved rounds (A B C, B C A, ...), each in its own worker process, so a noisy neighbour hits
all precisions alike; p50 carries its 95 % bootstrap interval and n, the speed-up column is the
ratio to fp32 of the same backend measured in the same rounds, the int8 ops column how many of
an int8 artifact's compute ops run in int8 (pipeline.backends.coverage; the float ones are listed
under the table), and the build column is each artifact's convert stage from an empty cache (for
int8: statistics, the search and the writer).
Results: bench/results/bench.json and bench/results/bench.md.

`make bench-arm` runs the same bench on the emulated Pi 4 (``--device sim-arm64``; BENCH_DEVICE=<target>
for a real board): the artifacts go over SSH to the device and the agent times them there. Under qemu only the int8/fp32 ratios
mean anything (the emulated CPU is a Cortex-A72, so the runtimes take the Pi 4's NEON kernels);
a few samples and runs keep it to minutes, and the builds come from the shared stage cache.
Results: bench/results/sim-arm64/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.backends.coverage import coverage_cell, coverage_line  # noqa: E402
from pipeline.registry import BACKENDS, get_backend  # noqa: E402
from pipeline.spec import PipelineSpec, load_spec, load_target  # noqa: E402

WORKLOADS = {"mnist": ROOT / "examples" / "mnist.yaml",
             "efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0.yaml",
             "mobilenet-v2": ROOT / "examples" / "mobilenet_v2.yaml",
             "digit-detector": ROOT / "examples" / "detector.yaml"}
RUNS = {"mnist": (20, 300), "efficientnet-lite0": (5, 60), "mobilenet-v2": (5, 60), "digit-detector": (10, 100)}
# On a device (one inference of an ImageNet model takes ~1 s under qemu, ~0.1 s on a Pi 4): few
# samples (accuracy there is not the point, the host bench measures it) and few runs, spread over
# the interleaved rounds.
DEVICE_VALIDATION = {"warmup": 2, "runs": 8, "samples": 24}


def runs_here(name: str, device: str) -> tuple[bool, str]:
    """Whether ``name`` can be built here and run on ``device`` (on ``local`` the device is this
    machine: a backend built on the device needs its runtime here too)."""
    import importlib.util

    backend = get_backend(name)
    ok, why = backend.available()
    if ok and device == "local" and backend.device_build({}) and importlib.util.find_spec(name) is None:
        return False, f"{name} is built and run on the device, and {name} is not installed on this machine"
    return ok, why


def device_backends(device: str) -> list[str]:
    """Every backend on ``local``; elsewhere those the device's target builds (its runtimes)."""
    return list(BACKENDS) if device == "local" else [b.backend for b in load_target(device).builds]


def bench_precisions(name: str, device: str) -> list[str]:
    """Every precision on ``local``; on a device fp32 and int8 (the ratio asked there)."""
    precisions = list(get_backend(name).precisions)
    return precisions if device == "local" else [p for p in precisions if p in ("fp32", "int8")]


def bench_spec(workload: str) -> PipelineSpec:
    """The workload's example spec without its validation block: the bench's target sets the timing
    (RUNS, DEVICE_VALIDATION, --rounds), and the example's block, written for a deploy, would win
    the field-by-field merge over it (spec.effective_validation)."""
    return load_spec(WORKLOADS[workload]).model_copy(update={"validation": None})


def bench_target(tmp: Path, workload: str, backends: list[str], rounds: int, device: str) -> str:
    """A target extending ``device`` that builds every precision of ``backends``; on ``local`` the
    releases go to a folder of the bench's own."""
    warmup, runs = RUNS[workload]
    validation = {"warmup": warmup, "runs": runs} if device == "local" else dict(DEVICE_VALIDATION)
    transport = {"root": str(tmp / "device" / workload)} if device == "local" else {"command_timeout_s": 3600}
    tdir = tmp / "targets"
    tdir.mkdir(exist_ok=True)
    name = f"bench-{workload}"
    (tdir / f"{name}.yaml").write_text(yaml.safe_dump({
        "extends": device, "transport": transport,
        "builds": [{"backend": b, "precisions": bench_precisions(b, device)} for b in backends],
        "validation": {**validation, "rounds": rounds}, "threads": 2}))
    return name


def main() -> int:
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--device", default="local",
                        help="target to measure on (not local: fp32 and int8 of its backends, builds from the shared stage cache)")
    args = parser.parse_args()

    from pipeline.agent.device_build import cpu_identity
    from pipeline.cache import Cache
    from pipeline.deploy import deploy

    here = {b: runs_here(b, args.device) for b in device_backends(args.device)}
    backends = [b for b, (ok, _) in here.items() if ok]
    skipped = {b: why for b, (ok, why) in here.items() if not ok}
    tmp = Path(tempfile.mkdtemp(prefix="edgeship-bench-"))
    os.environ["EDGESHIP_TARGETS_PATH"] = str(tmp / "targets")
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.platform(),
              "cpu": cpu_identity()["cpu"], "cpu_count": os.cpu_count(), "rounds": args.rounds, "device": args.device,
              "backends_skipped": skipped, "workloads": {}}
    for workload in args.workloads:
        spec = bench_spec(workload)
        target = load_target(bench_target(tmp, workload, backends, args.rounds, args.device))
        # A cold cache times the builds; on a device the builds are not what is measured
        cache = Cache(tmp / "stages" / workload) if args.device == "local" else Cache()
        t0 = time.perf_counter()
        first = deploy(spec, target, tmp / "build" / workload, cache=cache, log=lambda m: print(m, file=sys.stderr))
        report["workloads"][workload] = {"metric": spec.evaluation.metric_name, "reference": first["reference"],
                                         "model": first.get("model"), "build_and_first_run_s": round(time.perf_counter() - t0, 1),
                                         "rows": bench_rows(first)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def bench_rows(results: dict) -> list[dict]:
    """One row per run: accuracy, fidelity, latency with its interval and n, size, build time."""
    build_s = {st["stage"]: st["seconds"] for st in results["stages"]}
    rows = []
    for run in results["runs"]:
        lat = run.get("latency_ms") or {}
        rows.append({**{k: run.get(k) for k in ("backend", "precision", "accuracy", "accuracy_drop_pp",
                                                  "accuracy_drop_interval", "top1_agreement", "sqnr_db",
                                                  "peak_rss_mb", "model_rss_mb", "artifact_bytes", "error")},
                     "p50_ms": lat.get("p50"), "p50_low": lat.get("p50_low"), "p50_high": lat.get("p50_high"),
                     "p90_ms": lat.get("p90"), "cv": lat.get("cv"), "n": lat.get("runs"),
                     "build_s": build_s.get(f"{run['backend']} {run['precision']}"),
                     "calibration": run.get("calibration"), "int8_coverage": run.get("int8_coverage"),
                     "gate": run["gate"]["passed"]})
    for row in rows:
        base = next((r for r in rows if r["backend"] == row["backend"] and r["precision"] == "fp32"), None)
        row["speedup_vs_fp32"] = (round(base["p50_ms"] / row["p50_ms"], 2)
                                  if base and base["p50_ms"] and row["p50_ms"] else None)
    return rows


def markdown(report: dict) -> str:
    where = f"{report['host']} ({report.get('cpu', 'CPU not recorded')}, {report['cpu_count']} cores)"
    device = report.get("device", "local")
    if device.startswith("sim-"):
        where = (f"{device} (qemu user emulation of a Cortex-A72 on {where}; only the speed-up column "
                 "means anything, accuracy is on a few samples)")
    elif device != "local":
        where = f"{device} over SSH (accuracy on a few samples: the host bench measures it)"
    lines = [f"Measured {report['when']} on {where}, {report['rounds']} interleaved rounds, batch 1, 2 threads.", ""]
    for b, why in report["backends_skipped"].items():
        lines.append(f"- `{b}` not measured here: {why}")
    for name, w in report["workloads"].items():
        m = w["model"] or {}
        ties = w["reference"].get("tie_margin")
        metric = {"top1": "top-1 accuracy %", "map": "COCO mAP@[.5:.95] x 100"}.get(
            w["metric"], "top-1 agreement with fp32 %"
            + (f", a swap of classes within {ties} in fp32 probability counted as agreement" if ties else ""))
        # mAP is in its own points, not a percentage of samples; its drop has no paired interval
        value, unit = ("mAP", "") if w["metric"] == "map" else ("accuracy", "%")
        lines += ["", f"### {name} ({metric}; fp32 reference {w['reference']['accuracy']:.2f}{unit}, "
                      f"{w['reference'].get('samples')} samples, "
                      f"{m.get('params', 0) / 1e6:.2f} M params, {m.get('flops', 0) / 1e6:.1f} MFLOPs)", "",
                  f"| backend | precision | {value} | drop {'pp (95 % interval)' if unit else 'points'} | "
                  "strict top-1 agree % | SQNR dB | "
                  "p50 ms (95 % interval) | p90 ms | CV | speed-up vs fp32 | int8 ops | peak RSS MB | size kB | "
                  "build s | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in w["rows"]:
            lines.append(_row(r))
        notes = [f"- {r['backend']} int8: {line}" for r in w["rows"]
                 if (line := coverage_line(r.get("int8_coverage"))) and r.get("int8_coverage", {}).get("float")]
        lines += [""] + notes if notes else []
    return "\n".join(lines) + "\n"


def _f(v: object, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _row(r: dict) -> str:
    iv = r.get("accuracy_drop_interval") or {}
    drop = _f(r["accuracy_drop_pp"], "{:+.2f}") + (f" [{iv['low_pp']:+.2f}, {iv['high_pp']:+.2f}]" if iv else "")
    p50 = _f(r["p50_ms"], "{:.3f}") + (f" [{r['p50_low']:.3f}, {r['p50_high']:.3f}] n={r['n']}"
                                        if r.get("p50_low") is not None else "")
    return (f"| {r['backend']} | {r['precision']} | {_f(r['accuracy'])} | {drop} | {_f(r['top1_agreement'])} | "
            f"{_f(r['sqnr_db'], '{:.1f}')} | {p50} | {_f(r['p90_ms'], '{:.3f}')} | {_f(r.get('cv'))} | "
            f"{_f(r['speedup_vs_fp32'], '{:.2f}x')} | {coverage_cell(r.get('int8_coverage'))} | "
            f"{_f(r['peak_rss_mb'], '{:.0f}')} | "
            f"{_f((r['artifact_bytes'] or 0) / 1024, '{:.0f}')} | {_f(r.get('build_s'), '{:.1f}')} | "
            f"{'pass' if r['gate'] else 'FAIL'} |")


if __name__ == "__main__":
    raise SystemExit(main())
