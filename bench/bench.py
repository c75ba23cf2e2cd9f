"""`make bench`: fp32 vs fp16 vs int8, every available backend, both reference workloads.

Everything runs in one go on this machine through the real pipeline (build -> local device ->
agent in its own process). Latency is measured in ROUNDS interleaved rounds (each round runs
every artifact once, in turn) and the median of the per-round p50/p90 is reported, so a noisy
neighbour hits all precisions alike; the speed-up column is the ratio to fp32 of the same backend
measured in the same rounds. Results: bench/results/bench.json and bench/results/bench.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.registry import BACKENDS, get_backend  # noqa: E402
from pipeline.spec import load_spec, load_target  # noqa: E402

WORKLOADS = {"mnist": ROOT / "examples" / "mnist.yaml", "efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0.yaml"}
RUNS = {"mnist": (20, 300), "efficientnet-lite0": (5, 40)}


def bench_target(tmp: Path, workload: str, backends: list[str]) -> str:
    warmup, runs = RUNS[workload]
    tdir = tmp / "targets"
    tdir.mkdir(exist_ok=True)
    name = f"bench-{workload}"
    (tdir / f"{name}.yaml").write_text(yaml.safe_dump({
        "extends": "local", "transport": {"root": str(tmp / "device" / workload)},
        "builds": [{"backend": b, "precisions": list(get_backend(b).precisions)} for b in backends],
        "validation": {"warmup": warmup, "runs": runs}, "threads": 2}))
    return name


def main() -> int:
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    from pipeline.deploy import deploy, validate_current

    backends = [b for b in BACKENDS if get_backend(b).available()[0]]
    skipped = {b: get_backend(b).available()[1] for b in BACKENDS if b not in backends}
    tmp = Path(tempfile.mkdtemp(prefix="edgeship-bench-"))
    os.environ["EDGESHIP_TARGETS_PATH"] = str(tmp / "targets")
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.platform(),
              "cpu_count": os.cpu_count(), "rounds": args.rounds, "backends_skipped": skipped, "workloads": {}}
    for workload in args.workloads:
        spec = load_spec(WORKLOADS[workload])
        target = load_target(bench_target(tmp, workload, backends))
        t0 = time.perf_counter()
        first = deploy(spec, target, tmp / "build" / workload, log=lambda m: print(m, file=sys.stderr))
        build_s = time.perf_counter() - t0
        rounds = [first] + [validate_current(spec, target, tmp / "build" / workload, log=lambda m: None)
                            for _ in range(args.rounds - 1)]
        rows = []
        for i, run in enumerate(first["runs"]):
            per_round = [r["runs"][i]["latency_ms"] for r in rounds if r["runs"][i].get("latency_ms")]
            rows.append({**{k: run.get(k) for k in ("backend", "precision", "accuracy", "accuracy_drop_pp",
                                                      "top1_agreement", "sqnr_db", "peak_rss_mb", "model_rss_mb",
                                                      "artifact_bytes", "error")},
                         "p50_ms": statistics.median(p["p50"] for p in per_round) if per_round else None,
                         "p90_ms": statistics.median(p["p90"] for p in per_round) if per_round else None,
                         "calibration": run.get("calibration"), "gate": run["gate"]["passed"]})
        for row in rows:
            base = next((r for r in rows if r["backend"] == row["backend"] and r["precision"] == "fp32"), None)
            row["speedup_vs_fp32"] = (round(base["p50_ms"] / row["p50_ms"], 2)
                                      if base and base["p50_ms"] and row["p50_ms"] else None)
        report["workloads"][workload] = {"metric": spec.evaluation.metric, "reference": first["reference"],
                                         "model": first.get("model"), "build_and_first_run_s": round(build_s, 1),
                                         "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Measured {report['when']} on {report['host']} ({report['cpu_count']} cores), "
             f"{report['rounds']} interleaved rounds, batch 1, 2 threads.", ""]
    for b, why in report["backends_skipped"].items():
        lines.append(f"- `{b}` not measured here: {why}")
    for name, w in report["workloads"].items():
        m = w["model"] or {}
        ties = w["reference"].get("tie_margin")
        metric = ("top-1 accuracy %" if w["metric"] == "top1" else "top-1 agreement with fp32 %"
                  + (f", a swap of classes within {ties} in fp32 probability counted as agreement" if ties else ""))
        lines += ["", f"### {name} ({metric}; fp32 reference {w['reference']['accuracy']:.2f}%, "
                      f"{w['reference'].get('samples')} samples, "
                      f"{m.get('params', 0) / 1e6:.2f} M params, {m.get('flops', 0) / 1e6:.1f} MFLOPs)", "",
                  "| backend | precision | accuracy | drop pp | strict top-1 agree % | SQNR dB | p50 ms | p90 ms | "
                  "speed-up vs fp32 | peak RSS MB | size kB | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in w["rows"]:
            def f(v, fmt="{:.2f}"):
                return "-" if v is None else fmt.format(v)
            lines.append(f"| {r['backend']} | {r['precision']} | {f(r['accuracy'])} | {f(r['accuracy_drop_pp'], '{:+.2f}')} | "
                         f"{f(r['top1_agreement'])} | {f(r['sqnr_db'], '{:.1f}')} | {f(r['p50_ms'], '{:.3f}')} | {f(r['p90_ms'], '{:.3f}')} | "
                         f"{f(r['speedup_vs_fp32'], '{:.2f}x')} | {f(r['peak_rss_mb'], '{:.0f}')} | "
                         f"{f((r['artifact_bytes'] or 0) / 1024, '{:.0f}')} | {'pass' if r['gate'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
