"""TensorRT backend (host side).

An engine is specific to the GPU and the TensorRT version that built it, so for a Jetson the
engine must be built on the board itself; on an x86 host with a GPU it is built here. INT8 uses
TensorRT's *explicit* quantization: the QDQ model written by edgeship's calibration with
TensorRT's rules (symmetric int8, zero point 0, per-channel weights on the output axis), so the
ranges are the same ones every other backend gets. fp16 sets the FP16 builder flag.

Without TensorRT and a GPU, ``available()`` says so and targets listing this backend are refused
before any work starts.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from pipeline.backends.base import Artifact, BuildContext
from pipeline.errors import ConversionError


def _gpu_present() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists()


class TensorRTBackend:
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("tensorrt") is None:
            return False, ("python package 'tensorrt' is missing (it needs an NVIDIA GPU and driver); "
                           "build on a machine or Jetson with TensorRT, or remove tensorrt from the target's builds")
        if not _gpu_present():
            return False, "no NVIDIA GPU found (/dev/nvidia0); TensorRT engines can only be built on the GPU that runs them"
        return True, "ok"

    def version(self) -> dict[str, str]:
        import tensorrt

        return {"tensorrt": tensorrt.__version__}

    def convert(self, ctx: BuildContext, precision: str) -> Artifact:
        import tensorrt as trt

        onnx_path = ctx.onnx_fp32
        info: dict[str, Any] = {}
        if precision == "int8":
            from calibration import quantize_onnx

            from pipeline.backends.calibrate import calibration_config, calibration_set, search_metric

            qdq = ctx.workdir / "model.qdq.onnx"
            method = None if ctx.spec.calibration.method != "ort-default" else "entropy"
            cfg = calibration_config(ctx, method, activation_mode="symmetric", target="tensorrt")
            calib = calibration_set(ctx)
            info["calibration"] = quantize_onnx(onnx_path, qdq, calib, cfg, ctx.cache_dir / "calibration",
                                                search_metric(ctx)).to_dict()
            onnx_path = qdq
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConversionError(f"tensorrt {precision}: ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: ranges come from the QDQ nodes
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ConversionError(f"tensorrt {precision}: engine build failed (see TensorRT's log above)")
        out = ctx.workdir / "model.engine"
        out.write_bytes(bytes(engine))
        if precision != "int8":
            shutil.copyfile(ctx.onnx_fp32, ctx.workdir / "model.onnx")
        config_json = {"engine": out.name, "input": ctx.input_name, "output": ctx.output_name}
        from pipeline.backends.checks import check_outputs, run_runner

        got = run_runner("tensorrt", ctx.workdir, config_json, ctx.check.x, ctx.spec.input.shape[0])
        info.update(check_outputs(self.name, precision, ctx.reference, got))
        return Artifact(self.name, precision, ctx.workdir, [out.name], "tensorrt", config_json, info)


BACKEND = TensorRTBackend()
