"""ONNX Runtime backend (host side). The device side is pipeline/agent/runners/onnxruntime.py."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.backends.base import Artifact, BuildContext, device_build_config
from pipeline.backends.checks import check_artifact, run_runner_all
from pipeline.errors import ConversionError


class OnnxRuntimeBackend:
    name = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")

    def available(self) -> tuple[bool, str]:
        for module in ("onnx", "onnxruntime"):
            if importlib.util.find_spec(module) is None:
                return False, f"python package {module!r} is missing; run `make venv` (pip install 'edgeship[convert]')"
        return True, "ok"

    def device_build(self, options: dict[str, Any]) -> bool:
        # opt-in: the session's fully optimised graph is specific to the CPU that made it
        return bool(options.get("optimize_on_device", False))

    def version(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}

    def convert(self, ctx: BuildContext, precision: str) -> Artifact:
        if precision not in self.precisions:
            raise ConversionError(f"onnxruntime: precision {precision!r} not supported ({', '.join(self.precisions)})")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        out = ctx.workdir / "model.onnx"
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        if precision == "fp32":
            shutil.copyfile(ctx.onnx_fp32, out)
        elif precision == "fp16":
            _to_fp16(ctx.onnx_fp32, out)
        else:
            info["calibration"] = quantize_int8(ctx, out)
        info["convert_s"] = round(time.perf_counter() - t0, 3)
        config = {"model": out.name, "inputs": ctx.input_names, "outputs": ctx.output_names}
        batch = ctx.spec.input.shape[0]
        info.update(check_artifact(ctx, self.name, precision, lambda x: run_runner_all(
            "onnxruntime", ctx.workdir, config, x, batch, ctx.target.threads), info.get("calibration")))
        if self.device_build(ctx.build.options):  # checked above as shipped; the device optimises it for its CPU
            config["device_build"] = device_build_config(out, "model.optimized.onnx", ctx.build.options)
        return Artifact(self.name, precision, ctx.workdir, [out.name], "onnxruntime", config, info)


def _to_fp16(src: Path, out: Path) -> None:
    """fp16 weights and activations with fp32 model inputs/outputs (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(half, str(out))


def quantize_int8(ctx: BuildContext, out: Path) -> dict[str, Any]:
    """Static INT8 (QDQ): edgeship's calibration, or ORT's own defaults with method 'ort-default'."""
    cal = ctx.spec.calibration
    if cal.method == "ort-default":
        return _ort_default(ctx, out)
    from calibration import quantize_onnx

    from pipeline.backends.calibrate import calibration_config, calibration_set, search_metric

    cfg, calib = calibration_config(ctx), calibration_set(ctx)
    with quiet_root_logger():
        report = quantize_onnx(ctx.onnx_fp32, out, calib, cfg, ctx.cache_dir / "calibration", search_metric(ctx))
    return report.to_dict()


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger at
    WARNING for every quantize call; edgeship has already optimized the graph, so mute it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort_default(ctx: BuildContext, out: Path) -> dict[str, Any]:
    """onnxruntime.quantization.quantize_static with its defaults (the baseline users start from)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    x = ctx.calibration.single("ONNX Runtime's quantize_static (method ort-default)")
    batch = ctx.spec.input.shape[0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i + batch > len(x):
                return None
            chunk = x[self.i:self.i + batch]
            self.i += batch
            return {ctx.input_name: chunk}

    from calibration.search import SearchReport

    from pipeline.backends.calibrate import search_metric

    t0 = time.perf_counter()
    with quiet_root_logger():
        quantize_static(str(ctx.onnx_fp32), str(out), Reader())
    return SearchReport(metric=search_metric(ctx).name, method="ort-default",
                        reason="ort-default: onnxruntime.quantization.quantize_static with its defaults (no search)",
                        calibration_time_s=round(time.perf_counter() - t0, 3)).to_dict()


BACKEND = OnnxRuntimeBackend()
