"""`make bench-calibration`: edgeship's INT8 against the peers, side by side, on real labelled ImageNet.

Per model (EfficientNet-Lite0, MobileNetV2; MNIST with --workloads mnist), on the same fp32 ONNX
model (the pipeline's own export + optimize, the onnxruntime fp32 artifact) and the same 200
calibration images (class index % 5 == 0), judged on the same 400 evaluation images
(index % 5 in {1, 2}) against their labels:

* ONNX Runtime ``quantize_static`` with pure defaults (QDQ, per-tensor, U8 activations, MinMax);
* ONNX Runtime's careful settings: ``quant_pre_process`` then per-channel QDQ with MinMax,
  Percentile or Entropy and U8 activations, and MinMax with S8 activations;
* NNCF ``nncf.quantize`` with its defaults and with ``fast_bias_correction=False``;
* litert-torch's default PT2E int8 (``get_symmetric_quantization_config()``) for TFLite;
* edgeship's int8 build on each CPU backend (exactly the artifacts the pipeline ships, run with
  the device agent's runners).

Columns: top-1, the drop vs fp32 with its exact paired 95 % interval, agreement with fp32, output
SQNR, p50 (batch 1, 2 threads) with n, the int8/fp32 speed ratio on the same runtime (all models
timed in interleaved rounds), size and calibration time (edgeship: its cold int8 stage).
Writes bench/results/calibration.{md,json}. Peers that are not installed are skipped and named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.metrics import sqnr_db  # noqa: E402
from interleave import interleaved  # noqa: E402
from pipeline.validate.stats import discordant, p50_interval, paired_drop_interval  # noqa: E402

SPECS = {"efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0.yaml",
         "mobilenet-v2": ROOT / "examples" / "mobilenet_v2.yaml",
         "mnist": ROOT / "examples" / "mnist.yaml"}
BACKENDS = ("onnxruntime", "tflite", "ncnn")
ORT_CAREFUL = {"ort-pc-minmax-u8": ("MinMax", "QUInt8"), "ort-pc-percentile-u8": ("Percentile", "QUInt8"),
               "ort-pc-entropy-u8": ("Entropy", "QUInt8"), "ort-pc-minmax-s8": ("MinMax", "QInt8")}


@dataclass
class Model:
    """One measured model: how it runs (a runner with ``infer``), where its file is, its family."""

    name: str
    runtime: str  # the runtime it runs on: its fp32 is the speed reference
    runner: Any
    path: Path
    calib_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class _Session:
    """An ONNX Runtime session with the runners' interface (batch 1, 2 threads)."""

    def __init__(self, path: Path) -> None:
        from calibration.runtime import make_session

        self.session = make_session(path, threads=2)
        self.input = self.session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0], dtype=np.float32)


class _Interpreter:
    """A .tflite model run by LiteRT on NCHW float input (litert-torch's default keeps NCHW); an
    integer input or output (its default int8 model has int8 I/O) is (de)quantized with the
    tensor's own scale and zero point, as an application would."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(path), num_threads=2)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.inp["dtype"] != np.float32:
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self.inp["dtype"])
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            return (y.astype(np.float32) - zero) * scale
        return np.asarray(y, dtype=np.float32).copy()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- the pipeline's own artifacts ---------------------------------------------------------------

def _pipeline_build(spec: Any, work: Path, name: str, builds: list[dict[str, Any]]) -> Any:
    """``builds`` of ``spec`` through the pipeline on a ``local``-based target called ``name``,
    all sharing one stage cache under ``work``; the build result."""
    import yaml

    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_target

    target = work / "targets" / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump({"extends": "local", "name": name, "threads": 2, "builds": builds}))
    return build(spec, load_target(str(target)), work / "build" / name, cache=Cache(work / "stages"),
                 log=lambda m: print(m, file=sys.stderr))


def _artifact_model(art: Any, name: str, calib_s: float | None) -> Model:
    """A built artifact in the device agent's runner (2 threads), as a measured model."""
    from pipeline.agent.runners import load_runner_module

    runner = load_runner_module(art.runner).Runner(art.workdir, art.runner_config, 2)
    runner.activate()
    return Model(name, art.backend, runner, art.workdir / art.files[0], calib_s,
                 {"calibration": (art.info or {}).get("calibration"),
                  "bytes": sum((art.workdir / f).stat().st_size for f in art.files)})  # ncnn: .param + .bin


def edgeship_models(workload: str, work: Path) -> tuple[list[Model], Path, Any]:
    """Build fp32 + int8 on every CPU backend with the pipeline (cold stage cache) and wrap each
    artifact in the device agent's runner; returns them, the fp32 ONNX and the spec."""
    from pipeline.registry import get_backend
    from pipeline.spec import load_spec

    spec = load_spec(SPECS[workload])
    backends = [b for b in BACKENDS if get_backend(b).available()[0]]
    result = _pipeline_build(spec, work, "bench-calib", [{"backend": b, "precisions": ["fp32", "int8"]} for b in backends])
    stage_s = {e.stage: e.seconds for e in result.events}
    models = [_artifact_model(art, f"edgeship {art.backend} {art.precision}",
                              stage_s.get(f"{art.backend} {art.precision}") if art.precision == "int8" else None)
              for art in result.artifacts]
    fp32_onnx = next((m.path for m in models if m.name == "edgeship onnxruntime fp32"), None)
    assert fp32_onnx is not None, "the onnxruntime fp32 artifact is the peers' input"
    return models, fp32_onnx, spec


# ONNX Runtime's speed / fidelity trade-off where a fidelity floor is in the spec: the same int8
# build at lower floors (None: no floor), beside the shipped one. MobileNetV2 on ONNX Runtime
# needs float layers for its floor, and each costs speed; these rows show what a lower floor buys.
FLOOR_VARIANTS = {"mobilenet-v2": (None, 23.0, 24.0)}


def floor_variants(workload: str, work: Path) -> list[Model]:
    """The ONNX Runtime int8 build of ``workload`` at each of FLOOR_VARIANTS' floors, with the
    same stage cache as the shipped build (calibration statistics reused, so its calib s is
    warmer than the shipped build's cold stage; the search runs anew)."""
    from pipeline.spec import load_spec

    spec = load_spec(SPECS[workload])
    out = []
    for floor in FLOOR_VARIANTS.get(workload, ()):
        # only the onnxruntime build runs, so its floor is the only one that matters
        calibration = spec.calibration.model_copy(update={"min_sqnr_db": {"onnxruntime": floor}})
        result = _pipeline_build(spec.model_copy(update={"calibration": calibration}), work, f"bench-floor-{floor}",
                                 [{"backend": "onnxruntime", "precisions": ["int8"]}])
        stage_s = {e.stage: e.seconds for e in result.events}.get("onnxruntime int8")
        label = "no floor" if floor is None else f"floor {floor:g} dB"
        out.append(_artifact_model(result.artifacts[0], f"edgeship onnxruntime int8 ({label})", stage_s))
    return out


# ---- the peers ------------------------------------------------------------------------------------

def _reader(name: str, calib: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({name: calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    return Reader()


def ort_peers(fp32: Path, calib: np.ndarray, work: Path, which: list[str]) -> list[Model]:
    """quantize_static with its defaults, then with the careful settings (pre-processed model)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _Session(fp32).input
    out = []
    if "ort-default" in which:
        path = work / "ort-default.onnx"
        secs = _timed(lambda: quantize_static(str(fp32), str(path), _reader(name, calib)))
        out.append(Model("ort-default", "onnxruntime", _Session(path), path, secs))
    pre = work / "ort-pre.onnx"
    if any(k in which for k in ORT_CAREFUL):
        quant_pre_process(str(fp32), str(pre))
    for key, (method, act) in ORT_CAREFUL.items():
        if key not in which:
            continue
        path = work / f"{key}.onnx"
        secs = _timed(lambda: quantize_static(
            str(pre), str(path), _reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=getattr(QuantType, act), weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method)))
        out.append(Model(key, "onnxruntime", _Session(path), path, secs))
    return out


def nncf_peers(fp32: Path, calib: np.ndarray, work: Path, which: list[str]) -> list[Model]:
    """nncf.quantize on the ONNX model: defaults, and with the full (not fast) bias correction."""
    try:
        import nncf
        import onnx
    except ImportError:
        print("nncf is not installed: `make bench-calibration` installs the bench extra", file=sys.stderr)
        return []
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([{name: calib[i:i + 1]} for i in range(len(calib))])
    out = []
    for key, kwargs in (("nncf-default", {}), ("nncf-full-bias-correction", {"fast_bias_correction": False})):
        if key not in which:
            continue
        path = work / f"{key}.onnx"
        t0 = time.perf_counter()
        onnx.save(nncf.quantize(model, dataset, subset_size=len(calib), **kwargs), str(path))
        out.append(Model(key, "onnxruntime", _Session(path), path, time.perf_counter() - t0))
    return out


def litert_default(spec: Any, calib: np.ndarray, work: Path) -> list[Model]:
    """litert-torch's default PT2E int8 on the PyTorch model, calibrated on the same images."""
    import torch
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from pipeline.stages.inputs import model_loader

    t0 = time.perf_counter()
    model = model_loader(spec)().eval()
    sample = (torch.from_numpy(calib[:1].copy()),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config())
    graph = prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            graph(torch.from_numpy(calib[i:i + 1].copy()))
    graph = convert_pt2e(graph, fold_quantize=False)
    path = work / "litert-default-int8.tflite"
    path.write_bytes(bytes(litert_torch.convert(graph, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
                           .model_content()))
    secs = time.perf_counter() - t0
    fp32 = work / "litert-fp32.tflite"
    fp32.write_bytes(bytes(litert_torch.convert(model, sample).model_content()))
    return [Model("litert-default int8", "litert-nchw", _Interpreter(path), path, secs),
            Model("litert fp32", "litert-nchw", _Interpreter(fp32), fp32)]


# ---- measuring --------------------------------------------------------------------------------------

def predict(m: Model, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(m.runner.infer(x[i:i + 1]), np.float32).reshape(1, -1) for i in range(len(x))])


def latency(models: list[Model], x: np.ndarray, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Raw ms per model, every model timed in each of ``rounds`` interleaved rounds."""
    sample = np.ascontiguousarray(x[:1], dtype=np.float32)
    chunks = interleaved({m.name: (lambda m=m: m.runner.infer(sample)) for m in models}, rounds, per_round)
    return {name: [t for chunk in c for t in chunk] for name, c in chunks.items()}


def row(m: Model, out: np.ndarray, ref: np.ndarray, labels: np.ndarray, times: list[float],
        fp32_p50: float | None) -> dict[str, Any]:
    ok_ref, ok = ref.argmax(1) == labels, out.argmax(1) == labels
    iv = paired_drop_interval(*discordant(ok_ref, ok))
    p50, low, high = p50_interval(times)
    return {"model": m.name, "runtime": m.runtime, "top1": round(float(ok.mean()) * 100, 2),
            "drop_pp": round(float(iv["drop_pp"]), 2), "drop_low_pp": round(float(iv["low_pp"]), 2),
            "drop_high_pp": round(float(iv["high_pp"]), 2), "n": int(labels.size),
            "agreement": round(float((out.argmax(1) == ref.argmax(1)).mean()) * 100, 2),
            "sqnr_db": round(sqnr_db(ref, out), 2), "p50_ms": round(p50, 3), "p50_low": round(low, 3),
            "p50_high": round(high, 3), "timings_n": len(times),
            "speedup_vs_fp32": round(fp32_p50 / p50, 2) if fp32_p50 else None,
            "size_kb": round(m.info.get("bytes", m.path.stat().st_size) / 1024), "calib_s": None if m.calib_s is None else round(m.calib_s, 1),
            **({"edgeship": m.info} if m.info.get("calibration") else {})}


FP32_OF = {"onnxruntime": "edgeship onnxruntime fp32", "tflite": "edgeship tflite fp32",
           "ncnn": "edgeship ncnn fp32", "litert-nchw": "litert fp32"}


def bench_workload(workload: str, work: Path, peers: list[str], rounds: int, per_round: int) -> dict[str, Any]:
    from pipeline.stages.inputs import load_samples

    models, fp32_onnx, spec = edgeship_models(workload, work)
    models += floor_variants(workload, work)
    calib = np.asarray(load_samples(spec, "calibration").single("the calibration bench"), dtype=np.float32)
    evals = load_samples(spec, "evaluation")
    x, labels = np.asarray(evals.single("the calibration bench"), dtype=np.float32), np.asarray(evals.y).reshape(-1)
    models += ort_peers(fp32_onnx, calib, work, peers) + nncf_peers(fp32_onnx, calib, work, peers)
    if "litert-default" in peers:
        models += litert_default(spec, calib, work)
    outs = {m.name: predict(m, x) for m in models}
    ref = outs["edgeship onnxruntime fp32"]
    times = latency(models, x, rounds, per_round)
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    rows = [row(m, outs[m.name], ref, labels, times[m.name], p50.get(FP32_OF[m.runtime])) for m in models]
    return {"workload": workload, "n_calib": int(len(calib)), "n_eval": int(labels.size),
            "fp32_top1": round(float((ref.argmax(1) == labels).mean()) * 100, 2), "rows": rows}


def to_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# INT8 against the peers, on real labelled ImageNet", "",
             f"Measured {meta['when']} on {meta['machine']} ({meta.get('cpu', 'CPU not recorded')}, {meta['cores']} cores); onnxruntime {meta['onnxruntime']}, "
             f"nncf {meta.get('nncf') or 'not installed'}. Same fp32 ONNX model and the same calibration images for "
             "every method; top-1 on the evaluation images' labels; drop = fp32 top-1 - top-1 with its exact paired "
             "95 % interval; agreement and SQNR against the fp32 outputs; p50 at batch 1, 2 threads, every model "
             f"timed in {meta['rounds']} interleaved rounds of {meta['per_round']}; speed-up = fp32 p50 / p50 on the "
             "same runtime (litert-default against litert-torch's own fp32, NCHW). calib s: the peer's quantization "
             "call; edgeship's cold int8 stage (statistics, method search, fallback, writer).", ""]
    for r in results:
        lines += [f"## {r['workload']} (fp32 top-1 {r['fp32_top1']:.2f} %, calibration {r['n_calib']}, "
                  f"evaluation {r['n_eval']})", "",
                  "| model | top-1 % | drop pp [95 % interval] | agreement % | SQNR dB | p50 ms [95 %] (n) | "
                  "speed-up vs fp32 | size kB | calib s |", "|---|---|---|---|---|---|---|---|---|"]
        for w in r["rows"]:
            lines.append(f"| {w['model']} | {w['top1']:.2f} | {w['drop_pp']:+.2f} [{w['drop_low_pp']:+.2f}, "
                         f"{w['drop_high_pp']:+.2f}] | {w['agreement']:.2f} | {w['sqnr_db']:.1f} | "
                         f"{w['p50_ms']:.3f} [{w['p50_low']:.3f}, {w['p50_high']:.3f}] ({w['timings_n']}) | "
                         f"{'-' if w['speedup_vs_fp32'] is None else format(w['speedup_vs_fp32'], '.2f') + 'x'} | "
                         f"{w['size_kb']} | {'-' if w['calib_s'] is None else w['calib_s']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime

    peers_all = ["ort-default", *ORT_CAREFUL, "nncf-default", "nncf-full-bias-correction", "litert-default"]
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="efficientnet-lite0,mobilenet-v2")
    ap.add_argument("--peers", default=",".join(peers_all), help="comma-separated subset of " + ", ".join(peers_all))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-calib-"))
    try:
        results = [bench_workload(w, work / w, args.peers.split(","), args.rounds, args.per_round)
                   for w in args.workloads.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        import nncf
        nncf_version = nncf.__version__
    except ImportError:
        nncf_version = None
    from pipeline.agent.device_build import cpu_identity

    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpu": cpu_identity()["cpu"], "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "nncf": nncf_version,
            "rounds": args.rounds, "per_round": args.per_round, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    (out / "calibration.md").write_text(to_markdown(results, meta) + f"\nBench wall time {meta['wall_s']} s.\n")
    print((out / "calibration.md").read_text())


if __name__ == "__main__":
    main()
