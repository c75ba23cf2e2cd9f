"""Where ONNX Runtime's int8 time goes, next to fp32: why its int8 is not 2.5x faster here.

Builds a workload's ONNX Runtime fp32 and int8 artifacts (the shipped ones: ``local``-based
target, private stage cache), then runs both with the CPU execution provider as the device
runner loads them (ORT_ENABLE_ALL, batch 1, 2 threads) under ONNX Runtime's own profiler, in
interleaved rounds. Every kernel is put in a class by its op and, for convolutions, its group
(the optimised graph names the nodes the profiler times):

* ``conv 1x1 / full``: Conv, FusedConv, NCHWc Conv, QLinearConv with group 1;
* ``conv depthwise``: the same ops with group > 1;
* ``quantize / dequantize``: QuantizeLinear, DequantizeLinear (int8/float crossings);
* ``layout``: Transpose, ReorderInput/ReorderOutput (NHWC for int8 kernels, NCHWc for float);
* ``other``: the rest (Add, pooling, the classifier).

Per class: the median over runs of its summed kernel time with the 10th-90th percentile range
and n runs; speed-up = fp32 class time / int8 class time. Beside it, one large u8 x s8 GEMM
(MatMulInteger) against the fp32 MatMul of the same shape: what the int8 arithmetic itself buys
on this CPU. Usage::

    .venv/bin/python bench/ort_int8_profile.py [--workloads efficientnet-lite0 mobilenet-v2] [--runs 200]

Writes bench/results/ort-int8-profile.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from interleave import interleaved
from ncnn_int8_x86 import ROOT, build

from pipeline.agent.device_build import cpu_identity
from pipeline.agent.settle import settle

CLASSES = ("conv 1x1 / full", "conv depthwise", "quantize / dequantize", "layout", "other")
CONV_OPS = {"Conv", "FusedConv", "QLinearConv"}
LAYOUT_OPS = {"Transpose", "ReorderInput", "ReorderOutput"}
WARMUP = 5  # runs per session before the measured rounds, dropped from the profile
GEMM_CHUNK = 30  # GEMM runs per chunk; chunks of the two sessions alternate


def session(model: Path, optimized: Path, profile: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(optimized)
    opts.enable_profiling = profile
    opts.log_severity_level = 3  # the NCHWc serialisation warning is expected here
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def node_classes(optimized: Path) -> dict[str, str]:
    """Node name -> class, from the optimised graph the session ran."""
    import onnx

    classes = {}
    for n in onnx.load(str(optimized)).graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type in CONV_OPS:
            classes[n.name] = CLASSES[1] if group > 1 else CLASSES[0]
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            classes[n.name] = CLASSES[2]
        elif n.op_type in LAYOUT_OPS:
            classes[n.name] = CLASSES[3]
        else:
            classes[n.name] = CLASSES[4]
    return classes


def per_run(profile: Path, classes: dict[str, str]) -> list[dict[str, float]]:
    """Per model run: class -> summed kernel milliseconds (events sorted into runs by time)."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    out: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    starts = np.array([r[0] for r in runs])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0:
            out[i][classes.get(e["name"][: -len("_kernel_time")], CLASSES[4])] += e["dur"] / 1000
    return out


def profile_pair(models: dict[str, Path], work: Path, rounds: int, per_round: int) -> dict[str, list[dict[str, float]]]:
    """Both models profiled in interleaved rounds (warm-up runs are left out of the profile)."""
    x = np.random.default_rng(0).random((1, 3, 224, 224), np.float32)
    sessions = {k: session(p, work / f"{k}.opt.onnx", profile=True) for k, p in models.items()}
    for s in sessions.values():
        name = s.get_inputs()[0].name
        for _ in range(WARMUP):
            s.run(None, {name: x})
    for _ in range(rounds):
        for s in sessions.values():
            name = s.get_inputs()[0].name
            settle([os.getpid()])  # the other session's pool thread stops spinning first
            for _ in range(per_round):
                s.run(None, {name: x})
    out = {}
    for k, s in sessions.items():
        prof = Path(s.end_profiling())
        out[k] = per_run(prof, node_classes(work / f"{k}.opt.onnx"))[WARMUP:]
        prof.unlink()
    return out


def gemm_bound(m: int = 3136, k: int = 256, n: int = 256, runs: int = 300) -> dict[str, float]:
    """fp32 MatMul vs u8 x s8 MatMulInteger of one large shape, in alternating chunks, 2 threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def model(int8: bool) -> bytes:
        b = rng.integers(-127, 127, (k, n)).astype(np.int8) if int8 else rng.normal(size=(k, n)).astype(np.float32)
        node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["A", "B"], ["Y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.UINT8 if int8 else TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.INT32 if int8 else TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(b, "B")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    f32, i8 = (ort.InferenceSession(model(q), opts, providers=["CPUExecutionProvider"]) for q in (False, True))
    a32, a8 = rng.normal(size=(m, k)).astype(np.float32), rng.integers(0, 255, (m, k)).astype(np.uint8)
    # chunks of GEMM_CHUNK, alternated, each after the other session's pool is idle
    chunks = interleaved({"fp32": lambda: f32.run(None, {"A": a32}), "int8": lambda: i8.run(None, {"A": a8})},
                         runs // GEMM_CHUNK, GEMM_CHUNK)
    ms32, ms8 = (np.concatenate(chunks[v]) for v in ("fp32", "int8"))
    return {"shape": [m, k, n], "n": len(ms8), "speedup": float(np.median(ms32) / np.median(ms8)),
            **{f"{name}_{stat}": float(np.percentile(v, q)) for name, v in (("fp32", ms32), ("int8", ms8))
               for stat, q in (("ms", 50), ("p10", 10), ("p90", 90))}}


def summarise(runs: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per class (and total): median, 10th and 90th percentile ms for fp32 and int8, speed-up."""
    rows = []
    for cls in (*CLASSES, "total"):
        row: dict[str, Any] = {"class": cls}
        for k, rs in runs.items():
            v = np.array([sum(r.values()) if cls == "total" else r.get(cls, 0.0) for r in rs])
            row[k] = {"ms": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                      "p90": float(np.percentile(v, 90)), "n": len(v)}
        row["speedup"] = row["fp32"]["ms"] / row["int8"]["ms"] if row["int8"]["ms"] > 0 else None
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    g = report["gemm"]
    lines = ["# Where ONNX Runtime's int8 time goes (bench/ort_int8_profile.py)", "",
             f"Measured {report['when']} on {report['host']} ({report['cpu']}); onnxruntime {report['onnxruntime']}, "
             "CPU execution provider, ORT_ENABLE_ALL, batch 1, 2 threads; kernel times from ONNX Runtime's profiler, "
             "median over runs [10th-90th percentile], n runs.", "",
             f"The int8 arithmetic itself: one {g['shape'][0]}x{g['shape'][1]}x{g['shape'][2]} GEMM, "
             f"u8 x s8 MatMulInteger {g['int8_ms']:.3f} ms [{g['int8_p10']:.3f}, {g['int8_p90']:.3f}] vs fp32 MatMul "
             f"{g['fp32_ms']:.3f} ms [{g['fp32_p10']:.3f}, {g['fp32_p90']:.3f}] (n={g['n']} each, interleaved): "
             f"**{g['speedup']:.2f}x** (ratio of the medians).", ""]
    for workload, rows in report["workloads"].items():
        lines += [f"## {workload}", "", "| kernels | fp32 ms | int8 ms | speed-up |", "|---|---|---|---|"]
        for r in rows:
            cell = (lambda c: f"{c['ms']:.3f} [{c['p10']:.3f}, {c['p90']:.3f}] n={c['n']}")
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            name = f"**{r['class']}**" if r["class"] == "total" else r["class"]
            lines.append(f"| {name} | {cell(r['fp32'])} | {cell(r['int8'])} | {sp} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    import onnxruntime

    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="*", default=["efficientnet-lite0", "mobilenet-v2"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.platform(),
                              "cpu": f"{cpu_identity()['cpu']}, {os.cpu_count()} cores", "onnxruntime": onnxruntime.__version__,
                              "gemm": gemm_bound(), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="edgeship-ortprof-") as tmp:
        for workload in args.workloads:
            work = Path(tmp) / workload
            arts, _ = build(workload, work, backend="onnxruntime")
            models = {p: a.workdir / a.runner_config["model"] for p, a in arts.items()}
            report["workloads"][workload] = summarise(profile_pair(models, work, args.rounds, args.per_round))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort-int8-profile.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "ort-int8-profile.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
