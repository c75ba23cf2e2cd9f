"""TensorRT backend (host side): everything but the engine, which is built ON the device.

An engine is tied to the GPU and the TensorRT version that built it, so the host does what needs
the model and the data and ships it; the agent's prepare step (pipeline/agent/trt_build.py)
builds the engine on the board with its own TensorRT, caches it there, and the runner loads it.
The host therefore needs no TensorRT and no GPU.

What the release carries per precision:
- fp32, fp16: ``model.onnx`` (the optimized fp32 model); fp16 sets the FP16 builder flag there.
- int8: ``model.qdq.onnx``, edgeship's calibration written with TensorRT's explicit-quantization
  rules (symmetric int8, zero point 0, per-channel weights on the output axis), so the ranges
  are the ones every other backend gets; plus ``calibration.cache`` with the same activation
  ranges for implicit INT8 on older TensorRT.

The host's numeric check runs the shipped ONNX with ONNX Runtime (the engine itself is measured
and checked against the fp32 reference on the device).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.backends.base import Artifact, BuildContext, device_build_config, missing_packages
from pipeline.errors import SpecError

ENGINE = "model.engine"
CALIBRATION_CACHE = "calibration.cache"


class TensorRTBackend:
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")

    def device_build(self, options: dict[str, Any]) -> bool:
        return True  # always: an engine only runs on the GPU and TensorRT version that built it

    def available(self) -> tuple[bool, str]:
        # The host's half: ONNX handling, the QDQ calibration and its check. TensorRT and the GPU
        # are the device's business (a device without them fails its runs, with the reason).
        missing = missing_packages({"onnx": "onnx", "onnxruntime": "onnxruntime"})
        if missing:
            return False, f"python package(s) {', '.join(missing)} missing; run `make venv`"
        return True, "ok"

    def version(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        # The engine's TensorRT version is the device's; it is part of the engine cache key there.
        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "engine": "built on the device"}

    def convert(self, ctx: BuildContext, precision: str) -> Artifact:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        _check_profile(ctx)
        info: dict[str, Any] = {}
        files: list[str] = []
        if precision == "int8":
            onnx_file = ctx.workdir / "model.qdq.onnx"
            info["calibration"] = _quantize_qdq(ctx, onnx_file)
            from calibration.writers.tensorrt import calibration_cache_from_qdq

            scales = calibration_cache_from_qdq(onnx_file, ctx.workdir / CALIBRATION_CACHE)
            info["calibration_cache"] = {"file": CALIBRATION_CACHE, "tensors": len(scales)}
            files.append(CALIBRATION_CACHE)
        else:
            onnx_file = ctx.workdir / "model.onnx"
            shutil.copyfile(ctx.onnx_fp32, onnx_file)
        files.insert(0, onnx_file.name)
        config: dict[str, Any] = {"onnx": onnx_file.name, "inputs": ctx.input_names, "outputs": ctx.output_names,
                                  "input_shapes": {i.name: list(i.shape) for i in ctx.spec.input_specs()},
                                  "precision": precision}
        if precision == "int8":
            config["calibration_cache"] = CALIBRATION_CACHE
        info.update(_host_check(ctx, precision, onnx_file, info.get("calibration")))
        config["device_build"] = device_build_config(onnx_file, ENGINE, ctx.build.options)
        return Artifact(self.name, precision, ctx.workdir, files, "tensorrt", config, info)


def _check_profile(ctx: BuildContext) -> None:
    """A batch profile needs a batch dimension the model leaves open (bad input: exit 2)."""
    profile = ctx.build.options.get("profile")
    if profile and ctx.spec.input.batch != "dynamic":
        raise SpecError(f"{ctx.target.source_path}: field 'builds.options.profile': a TensorRT batch profile "
                        f"needs a dynamic batch, but {ctx.spec.source_path} exports a fixed one; set "
                        "input.batch: dynamic in the spec, or remove the profile")


def _quantize_qdq(ctx: BuildContext, out: Path) -> dict[str, Any]:
    """edgeship's calibration written as TensorRT explicit-quantization QDQ (the search report)."""
    from calibration import quantize_onnx

    from pipeline.backends.calibrate import calibration_config, calibration_set, search_metric
    from pipeline.backends.onnxruntime.convert import quiet_root_logger

    method = None if ctx.spec.calibration.method != "ort-default" else "entropy"
    cfg = calibration_config(ctx, method, activation_mode="symmetric", target="tensorrt")
    with quiet_root_logger():
        report = quantize_onnx(ctx.onnx_fp32, out, calibration_set(ctx), cfg, ctx.cache_dir / "calibration",
                               search_metric(ctx))
    return report.to_dict()


def _host_check(ctx: BuildContext, precision: str, onnx_file: Path,
                calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The shipped ONNX run by ONNX Runtime against the fp32 reference (fp16 is checked as fp32:
    the precision is the device builder's); int8 against the search's figure (``calibration``)."""
    from pipeline.backends.checks import check_artifact, run_runner_all

    config = {"model": onnx_file.name, "inputs": ctx.input_names, "outputs": ctx.output_names}
    out = check_artifact(ctx, "tensorrt", "int8" if precision == "int8" else "fp32", lambda x: run_runner_all(
        "onnxruntime", ctx.workdir, config, x, ctx.spec.input.shape[0], ctx.target.threads), calibration)
    out["check"]["runtime"] = "onnxruntime on the shipped ONNX (the engine is checked on the device)"
    return out


BACKEND = TensorRTBackend()
