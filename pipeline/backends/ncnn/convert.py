"""ncnn backend: optimized ONNX -> ncnn param/bin with pnnx; fp32, fp16 and INT8.

* fp32: pnnx ``fp16=0`` (float32 weights); the runner switches ncnn's fp16 options off, which
  ncnn otherwise turns on by itself on ARMv8.2 CPUs.
* fp16: pnnx ``fp16=1`` (weights stored as float16: half the file) *and* ncnn's
  ``use_fp16_storage/packed/arithmetic`` at load time (half-precision blobs and, where the CPU
  has it, arithmetic). The pnnx flag alone only shrinks the file (ncnn widens the weights back
  when fp16 storage is off); the load-time options alone would ship an fp32-sized file.
* int8: written by edgeship from its own calibration (see int8.py and activations.py); pnnx's
  fp32 model is the starting point, with the biases of the int8 layers taken from a pnnx
  conversion of the bias-corrected ONNX model (correction.py; the ONNX Runtime path's plan).

Build options (``target.builds[].options``):
    float_layers (list[str]): ncnn layer names to keep float at int8.

After every conversion the artifact runs on the host with the device's runner class and is
compared with the fp32 ONNX Runtime reference (pipeline.backends.checks, one set of thresholds).
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import installed_versions, missing_packages
from pipeline.backends.ncnn import pnnx
from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import Artifact, BuildContext

PARAM, BIN = "model.param", "model.bin"
_NEEDED = {"pnnx": "pnnx", "ncnn": "ncnn", "onnx": "onnx"}

class NcnnBackend:
    """pnnx converter + ncnn runtime (runner ``ncnn``)."""

    name = "ncnn"
    precisions = ("fp32", "fp16", "int8")

    def device_build(self, options: dict[str, Any]) -> bool:
        return False  # the host's artifact is what the device loads

    def available(self) -> tuple[bool, str]:
        """Whether pnnx (with its executable), ncnn and onnx are installed."""
        missing = missing_packages(_NEEDED)
        if missing:
            return False, f"missing {', '.join(missing)}: pip install 'edgeship[ncnn]' (pnnx, ncnn)"
        if pnnx.executable() is None:
            return False, "the pnnx wheel has no pnnx executable for this platform: reinstall pnnx"
        return True, "pnnx and ncnn are installed"

    def version(self) -> dict[str, str]:
        """Installed versions of pnnx, ncnn and onnx."""
        return installed_versions(("pnnx", "ncnn", "onnx"))

    def convert(self, ctx: "BuildContext", precision: str) -> "Artifact":
        """Convert ``ctx.onnx_fp32`` at ``precision``; write model.param/.bin; check numerically.

        Raises:
            ConversionError: unsupported precision or model, pnnx failure, failed numeric check.
        """
        from pipeline.backends.base import Artifact
        from pipeline.backends.checks import check_outputs, run_runner
        from pipeline.backends.ncnn import paramfile

        if precision not in self.precisions:
            raise ConversionError(f"ncnn: precision {precision!r} not supported; choose one of {self.precisions}")
        ok, reason = self.available()
        if not ok:
            raise ConversionError(f"ncnn: {reason}")
        t0 = time.perf_counter()
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        scratch = ctx.workdir / "_pnnx"
        scratch.mkdir(exist_ok=True)
        info: dict[str, Any] = {"converter": "pnnx", "source": "onnx"}
        try:
            param_path, bin_path, info["onnx_rewrites"] = pnnx.run(ctx, scratch, fp16=precision == "fp16")
            model = paramfile.read(param_path)
            inputs, outputs = model.inputs(), model.outputs()
            if len(inputs) != 1 or len(outputs) != 1:
                raise ConversionError(f"ncnn {precision}: expected one input and one output blob, got "
                                      f"{inputs} and {outputs}")
            config = {"param": PARAM, "bin": BIN, "input": inputs[0], "output": outputs[0],
                      "output_shape": [int(d) for d in ctx.reference.shape[1:]],
                      "fp16": precision == "fp16", "int8": precision == "int8"}
            if precision == "int8":
                from pipeline.backends.ncnn.quantize import build_int8

                info["calibration"] = build_int8(ctx, model, param_path, bin_path, config, scratch)
            else:
                shutil.copyfile(param_path, ctx.workdir / PARAM)
                shutil.copyfile(bin_path, ctx.workdir / BIN)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # pnnx's intermediates are not shipped
        info["layers"] = len(model.layers)
        info["size_bytes"] = (ctx.workdir / BIN).stat().st_size + (ctx.workdir / PARAM).stat().st_size
        info["convert_seconds"] = round(time.perf_counter() - t0, 2)
        # the same runner class the device uses, on real samples, against fp32 ONNX Runtime
        got = run_runner("ncnn", ctx.workdir, config, ctx.check.x, 1, ctx.target.threads)
        info.update(check_outputs(self.name, precision, ctx.reference, got))
        c = info["check"]
        ctx.log(f"ncnn {precision}: {info['size_bytes'] / 1024:.0f} KiB, check rel_diff={c['rel_diff']:.2e} "
                f"sqnr={c['sqnr_db']:.1f}dB top1_agree={c['top1_agreement']:.1f}%")
        return Artifact(backend=self.name, precision=precision, workdir=ctx.workdir, files=[PARAM, BIN],
                        runner="ncnn", runner_config=config, info=info)


BACKEND = NcnnBackend()
