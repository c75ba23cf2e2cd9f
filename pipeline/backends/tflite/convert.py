"""TFLite / LiteRT backend: PyTorch -> .tflite with litert-torch (fp32, fp16, int8).

The one route that leaves from the PyTorch model (``ctx.torch_model()``) rather than the ONNX
hub model: no maintained ONNX->TFLite converter fits these versions. INT8 still calibrates on
the same samples as every other backend (``ctx.calibration``).

Build options (``target.builds[].options``):
    int8_io (bool, default false): keep the int8 input/output tensors the full-integer model
        has natively; the runner then quantizes inputs and dequantizes outputs with the
        parameters recorded in runner_config. Default: float32 I/O (QUANTIZE/DEQUANTIZE ops are
        added inside the model, a drop-in for the fp32 model).
    channels_last_io (bool, default false): convert an NCHW model with an NHWC input (no
        leading TRANSPOSE in the graph); the runner transposes the NCHW samples.
    observer ("minmax" | "histogram", default "minmax"): INT8 activation observer (build.py);
        ``minmax`` observers take the shared calibration plan's ranges, ``histogram`` keeps
        PT2E's own L2-optimal clipping.
    float_layers (list[str]): PyTorch module names whose conv / linear stay float at INT8
        (added to those ``calibration.fallback`` picks, see build.py).

After every conversion the artifact runs on the host with the device's runner class and is
compared with the fp32 ONNX Runtime reference (pipeline.backends.checks, one set of thresholds).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import installed_versions, missing_packages
from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import Artifact, BuildContext

MODEL_FILE = "model.tflite"
_TOOLS = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch", "torchao")
_NEEDED = {"torch": "torch", "litert_torch": "litert-torch", "ai_edge_litert": "ai-edge-litert",
           "ai_edge_quantizer": "ai-edge-quantizer", "torchao": "torchao"}


class TFLiteBackend:
    """litert-torch converter + LiteRT interpreter (runner ``tflite``)."""

    name = "tflite"
    precisions = ("fp32", "fp16", "int8")

    def device_build(self, options: dict[str, Any]) -> bool:
        return False  # the host's artifact is what the device loads

    def available(self) -> tuple[bool, str]:
        """Whether litert-torch, ai-edge-litert, ai-edge-quantizer and torch are installed."""
        missing = missing_packages(_NEEDED)
        if missing:
            return False, (f"missing {', '.join(missing)}: pip install 'edgeship[tflite]' "
                           "(litert-torch, ai-edge-litert; keep torch pinned with -c constraints.txt)")
        return True, "litert-torch and ai-edge-litert are installed"

    def version(self) -> dict[str, str]:
        """Installed versions of the conversion tools (absent ones are left out)."""
        return installed_versions(_TOOLS)

    def convert(self, ctx: "BuildContext", precision: str) -> "Artifact":
        """Convert at ``precision``, write ``model.tflite`` under ``ctx.workdir``, check it numerically.

        Raises:
            ConversionError: unsupported precision, converter failure, or failed numeric check.
        """
        from pipeline.backends.base import Artifact
        from pipeline.backends.checks import check_artifact, run_runner_all
        from pipeline.backends.tflite import build, interface, padfold

        if precision not in self.precisions:
            raise ConversionError(f"tflite: precision {precision!r} not supported; choose one of {self.precisions}")
        ok, reason = self.available()
        if not ok:
            raise ConversionError(f"tflite: {reason}")
        opts = ctx.build.options
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info: dict[str, Any] = {"converter": "litert-torch", "source": "pytorch"}
        try:
            prepared = build.prepare(ctx)
            if precision == "int8":
                model, info["calibration"] = build.convert_int8(prepared, ctx)
            else:
                model = build.convert_fp32(prepared)
                if precision == "fp16":
                    model, info["fp16"] = build.cast_weights_fp16(model)
        except ConversionError:
            raise
        except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError, AssertionError) as err:
            # litert-torch / torch.export raise these for unsupported graphs; keep the cause chained
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConversionError(f"tflite {precision}: litert-torch conversion failed: {first}") from err

        io = interface.io_details(model)
        input_quant = output_quant = None
        if precision == "int8":
            if opts.get("int8_io"):
                if len(io["inputs"]) != 1 or len(io["outputs"]) != 1:
                    raise ConversionError(f"tflite int8: int8_io takes a model with one input and one output, "
                                          f"this one has {len(io['inputs'])} and {len(io['outputs'])}")
                input_quant, output_quant = _quant_of(io["inputs"][0]), _quant_of(io["outputs"][0])
            else:
                model = interface.add_float_io(model)
                io = interface.io_details(model)
        # last rewrite before the numeric check below, so the check runs the model as shipped
        model, info["pads_folded"] = padfold.fold_pads(model)
        (ctx.workdir / MODEL_FILE).write_bytes(model)
        config = {
            "model": MODEL_FILE,
            "inputs": ctx.input_names,
            "outputs": ctx.output_names,
            "signature": signature_names(ctx, prepared, model, precision),
            "batch": prepared.batch,
            "data_layout": prepared.data_layout,
            "model_layout": prepared.model_layout,
            "input_quant": input_quant,
            "output_quant": output_quant,
        }
        info["convert_seconds"] = round(time.perf_counter() - t0, 2)
        info["io"] = io
        info["tensor_types"] = interface.tensor_types(model)
        info["size_bytes"] = len(model)
        # the same runner class the device uses, on real samples, against fp32 ONNX Runtime
        info.update(check_artifact(ctx, self.name, precision, lambda x: run_runner_all(
            "tflite", ctx.workdir, config, x, prepared.batch, ctx.target.threads), info.get("calibration")))
        ctx.log(f"tflite {precision}: {len(model) / 1024:.0f} KiB, check {_summary(info['check'])}")
        return Artifact(backend=self.name, precision=precision, workdir=ctx.workdir, files=[MODEL_FILE],
                        runner="tflite", runner_config=config, info=info)


def signature_names(ctx: "BuildContext", prepared: Any, model: bytes, precision: str) -> dict[str, str]:
    """ONNX input/output name -> the model signature's name for it.

    litert-torch names the i-th positional input ``args_i`` and the i-th output ``output_i``, or a
    dict output's entries by their keys (its signature lists them sorted, so order says nothing):
    the names are derived from the module's own output and then checked against the signature.
    """
    import torch

    from pipeline.stages.export import flatten_outputs

    with torch.no_grad():
        flat, keys = flatten_outputs(prepared.module(*prepared.args))
    outs = keys if keys is not None else [f"output_{i}" for i in range(len(flat))]
    names = {**{n: f"args_{i}" for i, n in enumerate(ctx.input_names)}, **dict(zip(ctx.output_names, outs))}
    sig = _signature(model)
    if sorted(sig["inputs"]) != sorted(names[n] for n in ctx.input_names) or \
            sorted(sig["outputs"]) != sorted(names[n] for n in ctx.output_names):
        raise ConversionError(f"tflite {precision}: the model's signature has inputs {sig['inputs']} and outputs "
                              f"{sig['outputs']}; expected {[names[n] for n in ctx.input_names]} and "
                              f"{[names[n] for n in ctx.output_names]} for {ctx.input_names} and {ctx.output_names}")
    return names


def _signature(model: bytes) -> dict[str, list[str]]:
    """The inputs and outputs of the model's one signature (litert-torch writes ``serving_default``)."""
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=model).get_signature_list()
    if len(signatures) != 1:
        raise ConversionError(f"tflite: expected one signature in the converted model, found {sorted(signatures)}")
    return next(iter(signatures.values()))


def _quant_of(tensor: dict[str, Any]) -> dict[str, Any]:
    """runner_config quantization entry of an integer I/O tensor."""
    if tensor["quant"] is None or tensor["dtype"] not in ("int8", "uint8", "int16"):
        raise ConversionError(f"tflite int8: I/O tensor {tensor['name']!r} is {tensor['dtype']} without "
                              "per-tensor quantization; cannot honour int8_io")
    return {**tensor["quant"], "dtype": tensor["dtype"]}


def _summary(check: dict[str, Any]) -> str:
    agree = check.get("top1_agreement")  # only outputs shaped (N, classes) have one (e.g. not a detector's)
    return (f"rel_diff={check['rel_diff']:.2e} sqnr={check['sqnr_db']:.1f}dB"
            + (f" top1_agree={agree:.1f}%" if agree is not None else ""))


BACKEND = TFLiteBackend()
