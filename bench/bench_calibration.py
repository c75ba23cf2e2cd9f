"""Calibration bench: edgeship INT8 vs ONNX Runtime's quantize_static defaults, side by side.

For each reference workload (MNIST-5k CNN, EfficientNet-Lite0) on ONNX Runtime:
fp32; ``quantize_static`` with pure defaults; edgeship with each observer; edgeship ``auto`` with
the accuracy-aware fallback. Columns: accuracy (MNIST) or top-1 agreement and output SQNR vs
fp32 on the *evaluation* split, drop vs fp32, latency p50 (batch 1, 2 threads, warm-up, then
interleaved rounds so every model sees the same machine load), model size, calibration time.

    python bench/bench_calibration.py            # writes bench/results/calibration.{md,json}
    python bench/bench_calibration.py --quick    # fewer latency rounds (smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration import CalibrationConfig, CalibrationSet, check_overlap, quantize_onnx  # noqa: E402
from calibration.config import METHODS  # noqa: E402
from calibration.metrics import fidelity  # noqa: E402
from calibration.runtime import make_session, predict  # noqa: E402

#: holdout budget for auto+fallback: MNIST accuracy drop; EfficientNet top-1 disagreement on
#: the 20 % holdout of its (small) calibration set
BUDGETS = {"mnist": 0.3, "effnet": 5.0}


def export(workload: str, work: Path) -> Path:
    """PyTorch -> ONNX (dynamo, dynamic batch) -> the pipeline's optimize stage (fold Conv+BN)."""
    import torch

    from pipeline.stages.optimize import optimize_onnx
    from pipeline.workloads import effnet, mnist

    mod = mnist if workload == "mnist" else effnet
    model = mod.pretrained_model()
    xc, _ = mod.calibration_split()
    raw = work / f"{workload}_raw.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(xc[:2].copy()),), str(raw), dynamo=True, external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},), verbose=False,
    )
    out = work / f"{workload}_fp32.onnx"
    optimize_onnx(raw, out, xc[:4], 4)
    return out


def ort_default(fp32: Path, out: Path, calib: np.ndarray) -> float:
    """quantize_static with nothing but a calibration reader (its defaults: QDQ, U8S8, MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = make_session(fp32).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({name: calib[i : i + 16]} for i in range(0, len(calib), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    t0 = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader())
    return time.perf_counter() - t0


def latency_p50(
    paths: dict[str, Path], x: np.ndarray, rounds: int, warmup: int = 10
) -> tuple[dict[str, float], dict[str, float]]:
    """p50 ms per model, and the median per-round time ratio to ORT's default model.

    Models run in interleaved rounds so load spikes hit all of them; the per-round ratio is the
    robust number on a shared machine (absolute milliseconds move with other people's jobs).
    """
    sessions = {k: make_session(p, threads=2) for k, p in paths.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    sample = x[:1]
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, {names[k]: sample})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {names[k]: sample})
            times[k].append((time.perf_counter() - t0) * 1e3)
    base = np.array(times["ort_default"])
    ratio = {k: float(np.median(np.array(v) / base)) for k, v in times.items()}
    return {k: float(np.percentile(v, 50)) for k, v in times.items()}, ratio


def bench_workload(workload: str, work: Path, rounds: int) -> dict[str, Any]:
    from pipeline.workloads import effnet, mnist

    mod = mnist if workload == "mnist" else effnet
    xc, yc = mod.calibration_split()
    xe, ye = mod.evaluation_split()
    calib = CalibrationSet.from_arrays(xc, labels=yc)
    evals = CalibrationSet.from_arrays(xe, labels=ye)
    check_overlap(calib, evals)
    fp32 = export(workload, work)
    ref = predict(make_session(fp32), xe)
    rows: dict[str, dict[str, Any]] = {"fp32": {"calib_s": 0.0}}
    paths = {"fp32": fp32}

    paths["ort_default"] = work / f"{workload}_ort_default.onnx"
    rows["ort_default"] = {"calib_s": ort_default(fp32, paths["ort_default"], xc)}

    cache = work / "stats-cache"
    for m in METHODS:
        paths[m] = work / f"{workload}_{m}.onnx"
        rep = quantize_onnx(fp32, paths[m], calib, CalibrationConfig(method=m), cache)
        rows[m] = {"calib_s": rep.calibration_time_s, "stats_cache_hit": rep.stats_cache_hit}
    paths["auto+fallback"] = work / f"{workload}_auto.onnx"
    rep = quantize_onnx(
        fp32, paths["auto+fallback"], calib,
        CalibrationConfig(method="auto", max_drop_pp=BUDGETS[workload], max_fallback_layers=8), cache,
    )
    rows["auto+fallback"] = {
        "calib_s": rep.calibration_time_s, "stats_cache_hit": rep.stats_cache_hit,
        "method": rep.method, "reason": rep.reason, "method_scores": rep.method_scores,
        "fallback_layers": [f.name for f in rep.fallback_layers], "budget_met": rep.budget_met,
        "budget_reason": rep.budget_reason, "holdout": rep.holdout,
    }

    for k, p in paths.items():
        out = predict(make_session(p), xe)
        f = fidelity(ref, out, ye)
        rows[k].update(
            sqnr_db=round(f["sqnr_db"], 2) if k != "fp32" else None,
            top1_agreement=round(f["top1_agreement"], 2),
            accuracy=round(f["accuracy"], 2) if ye is not None else None,
            drop_pp=round(f["drop_pp"], 3),
            size_kb=round(p.stat().st_size / 1024, 1),
        )
    lat, ratio = latency_p50(paths, xe, rounds)
    for k, v in lat.items():
        rows[k]["p50_ms"] = round(v, 3)
        rows[k]["time_vs_ort_default"] = round(ratio[k], 3)
    return {"workload": workload, "n_calib": len(calib), "n_eval": len(evals), "budget_pp": BUDGETS[workload],
            "rows": rows}


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Calibration bench: edgeship INT8 vs ONNX Runtime quantize_static defaults", "",
             f"Machine: {meta['machine']}; onnxruntime {meta['onnxruntime']}; latency = batch 1, 2 threads, "
             f"p50 of {meta['rounds']} interleaved rounds after warm-up; 'time / ORT default' is the median per-round ratio (robust to load from other jobs on a shared machine). Metrics on the evaluation split "
             "(never seen by calibration). drop = fp32 accuracy - int8 accuracy (MNIST) or 100 - top-1 "
             "agreement (EfficientNet-Lite0, no labels).", ""]
    for r in results:
        lines += [f"## {r['workload']} (calibration {r['n_calib']}, evaluation {r['n_eval']})", "",
                  "| model | accuracy % | top-1 agree % | SQNR dB | drop pp | p50 ms | time / ORT default | size KB | calib s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, row in r["rows"].items():
            acc = "" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
            sq = "" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f}"
            lines.append(f"| {k} | {acc} | {row['top1_agreement']:.2f} | {sq} | {row['drop_pp']:.2f} | "
                         f"{row['p50_ms']:.3f} | {row['time_vs_ort_default']:.2f} | {row['size_kb']:.0f} | {row['calib_s']:.1f} |")
        auto = r["rows"]["auto+fallback"]
        lines += ["", f"auto chose **{auto['method']}**: {auto['reason']}.",
                  f"Fallback (holdout budget {r['budget_pp']} pp): layers in float {auto['fallback_layers'] or 'none'}, "
                  f"budget met: {auto['budget_met']} {auto['budget_reason']}", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="30 latency rounds instead of 200")
    ap.add_argument("--workloads", default="mnist,effnet")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    rounds = 30 if args.quick else 200
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-calib-") as tmp:
        for w in args.workloads.split(","):
            results.append(bench_workload(w, Path(tmp), rounds))
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "onnxruntime": onnxruntime.__version__,
            "rounds": rounds, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / "calibration.md").write_text(to_markdown(results, meta) + f"\nBench wall time {meta['wall_s']} s.\n")
    print((out / "calibration.md").read_text())


if __name__ == "__main__":
    main()
