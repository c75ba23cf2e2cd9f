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
    int8_depthwise ("auto" | "int8" | "float"): which depthwise convs int8 quantizes; auto keeps
        those ncnn's x86 int8 kernel runs slower than fp32 float on x86_64 targets (all but 3x3
        stride 2; int8.fast_int8_depthwise) and quantizes every one on other CPUs.

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
    arch_dependent = ("int8",)  # int8_depthwise: auto differs on x86_64 (quantize.depthwise_policy)

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
        from pipeline.backends.checks import check_artifact, run_runner_all
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
            blobs = blob_names(ctx, model.inputs(), model.outputs(), precision)
            config = {"param": PARAM, "bin": BIN, "inputs": ctx.input_names, "outputs": ctx.output_names,
                      "blobs": blobs, "input": blobs[ctx.input_name], "output": blobs[ctx.output_name],
                      "output_shapes": {n: [int(d) for d in r.shape[1:]] for n, r in ctx.reference.items()},
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
        info.update(check_artifact(ctx, self.name, precision, lambda x: run_runner_all(
            "ncnn", ctx.workdir, config, x, 1, ctx.target.threads), info.get("calibration")))
        c = info["check"]
        agree = c.get("top1_agreement")  # only outputs shaped (N, classes) have one (e.g. not a detector's)
        ctx.log(f"ncnn {precision}: {info['size_bytes'] / 1024:.0f} KiB, check rel_diff={c['rel_diff']:.2e} "
                f"sqnr={c['sqnr_db']:.1f}dB" + (f" top1_agree={agree:.1f}%" if agree is not None else ""))
        return Artifact(backend=self.name, precision=precision, workdir=ctx.workdir, files=[PARAM, BIN],
                        runner="ncnn", runner_config=config, info=info)


def blob_names(ctx: "BuildContext", inputs: list[str], outputs: list[str], precision: str) -> dict[str, str]:
    """ONNX input/output name -> ncnn blob, read from the .param file, never guessed: pnnx names the
    model's i-th input ``in{i}`` and its i-th output ``out{i}``, and the file must hold exactly those
    (the INT8 builder reads ``input``/``output``: the first of each)."""
    want = {**{n: f"in{i}" for i, n in enumerate(ctx.input_names)},
            **{n: f"out{i}" for i, n in enumerate(ctx.output_names)}}
    if sorted(inputs) != sorted(f"in{i}" for i in range(len(ctx.input_names))) or \
            sorted(outputs) != sorted(f"out{i}" for i in range(len(ctx.output_names))):
        raise ConversionError(f"ncnn {precision}: the model's inputs {ctx.input_names} and outputs {ctx.output_names} "
                              f"became blobs {inputs} and {outputs}; expected in0.. and out0.., one per tensor")
    return want


BACKEND = NcnnBackend()
