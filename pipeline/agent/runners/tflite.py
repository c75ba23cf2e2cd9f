"""TFLite / LiteRT runner: ``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter``.

Runs on the device with numpy and one of the two interpreters, nothing else of edgeship.
``tflite_runtime`` 2.14 was built against numpy 1.x: on a device that has only it, pin
``numpy<2`` (with numpy 2 its Interpreter raises SystemError).

``config`` (written by pipeline/backends/tflite at conversion time)::

    {"model": "model.tflite",
     "inputs": ["image", "extra"], "outputs": ["logits"],   # the model's ONNX names, in order
     "signature": {"image": "args_0", "extra": "args_1", "logits": "output_0"},  # their signature names
     "batch": 1,                      # the model's static batch (inputs are chunked to it)
     "data_layout": "NCHW",           # layout of the float samples the agent hands in
     "model_layout": "NCHW",          # layout of the model's input tensor
     "input_quant": null | {"scale": s, "zero_point": z, "dtype": "int8"},
     "output_quant": null | {"scale": s, "zero_point": z, "dtype": "int8"}}

Tensors are found through the model's one signature (``serving_default``), not by position: the
interpreter's input and output lists need not follow the model's order. Older configs (no
``signature``) run the signature's first input and output.

With ``input_quant`` set the model takes integer inputs: the runner quantizes the float samples
(``q = clip(round(x / scale) + zero_point)``); with ``output_quant`` it dequantizes outputs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from . import feeds, io_names

_INTERPRETERS = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
_INT_RANGES = {"int8": (-128, 127, np.int8), "uint8": (0, 255, np.uint8), "int16": (-32768, 32767, np.int16)}


def _interpreter_module() -> Any:
    """The first interpreter module installed on this device (LiteRT preferred)."""
    missing = []
    for name in _INTERPRETERS:
        try:
            return importlib.import_module(name)
        except ImportError as err:  # try the next runtime; report all if none imports
            missing.append(f"{name}: {err}")
    raise ImportError("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime with numpy<2); "
                      + "; ".join(missing))


def runtime_version() -> str:
    """``ai-edge-litert X`` or ``tflite-runtime X``, whichever the runner will use."""
    mod = _interpreter_module()
    top = mod.__name__.split(".")[0]
    from importlib import metadata

    dist = top.replace("_", "-")
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return f"{dist} {getattr(importlib.import_module(top), '__version__', 'unknown')}"


def _transpose_for(data_layout: str, model_layout: str) -> tuple[int, ...] | None:
    """Axes that turn a batch in ``data_layout`` into ``model_layout`` (None: same layout)."""
    if data_layout == model_layout:
        return None
    if (data_layout, model_layout) == ("NCHW", "NHWC"):
        return (0, 2, 3, 1)
    if (data_layout, model_layout) == ("NHWC", "NCHW"):
        return (0, 3, 1, 2)
    raise ValueError(f"cannot convert input layout {data_layout} to {model_layout}")


def quantize(x: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    """Float -> integer with the model's input quantization.

    Rounds half away from zero, as TFLite's own QUANTIZE kernel (``std::round``) does, so a model
    with int8 inputs sees exactly what the float-input variant would compute inside.
    """
    lo, hi, dtype = _INT_RANGES[q["dtype"]]
    v = x.astype(np.float32) / np.float32(q["scale"])
    v = np.trunc(v + np.copysign(np.float32(0.5), v))
    return np.clip(v + int(q["zero_point"]), lo, hi).astype(dtype)


def dequantize(y: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    """Integer -> float with the model's output quantization."""
    return ((y.astype(np.float32) - int(q["zero_point"])) * float(q["scale"])).astype(np.float32)


class Runner:
    """Runs one .tflite model on the CPU (XNNPACK where the interpreter applies it)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.path = Path(run_dir) / config["model"]
        self.batch = int(config.get("batch", 1))
        self.axes = _transpose_for(config.get("data_layout", "NCHW"), config.get("model_layout", "NCHW"))
        self.input_quant = config.get("input_quant")
        self.output_quant = config.get("output_quant")
        self.inputs = io_names(config, "input") or []
        self.outputs = io_names(config, "output") or []
        self.signature = dict(config.get("signature") or {})
        self.threads = threads
        self.interpreter: Any = None
        self._in: dict[str, int] = {}
        self._out: dict[str, int] = {}

    def activate(self) -> None:
        """Load the model, allocate its tensors and find each input and output by its signature name."""
        mod = _interpreter_module()
        self.interpreter = mod.Interpreter(model_path=str(self.path), num_threads=self.threads)
        self.interpreter.allocate_tensors()
        (sig_name, sig), = self.interpreter.get_signature_list().items()
        runner = self.interpreter.get_signature_runner(sig_name)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        if not self.signature:  # an older config: the one input and output
            self.inputs, self.outputs = self.inputs[:1] or ["input"], self.outputs[:1] or ["output"]
            self.signature = {self.inputs[0]: sig["inputs"][0], self.outputs[0]: sig["outputs"][0]}
        self._in = {n: int(ins[self.signature[n]]["index"]) for n in self.inputs}
        self._out = {n: int(outs[self.signature[n]]["index"]) for n in self.outputs}
        first = ins[self.signature[self.inputs[0]]]
        want = np.dtype(np.float32) if self.input_quant is None else np.dtype(_INT_RANGES[self.input_quant["dtype"]][2])
        if np.dtype(first["dtype"]) != want:
            raise ValueError(f"{self.path.name}: input dtype {np.dtype(first['dtype'])} but config expects {want}")

    def _feed(self, chunk: np.ndarray) -> np.ndarray:
        if self.axes is not None:
            chunk = chunk.transpose(self.axes)
        if self.input_quant is not None:
            return np.ascontiguousarray(quantize(chunk, self.input_quant))
        return np.ascontiguousarray(chunk, dtype=np.float32)

    def _invoke(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arr in chunk.items():
            self.interpreter.set_tensor(self._in[name], self._feed(arr))
        self.interpreter.invoke()
        outs = {}
        for name, index in self._out.items():
            out = self.interpreter.get_tensor(index)
            # dequantize or copy: the interpreter reuses its buffers
            outs[name] = dequantize(out, self.output_quant) if self.output_quant is not None \
                else np.array(out, dtype=np.float32)
        return outs

    def run(self, x: Any) -> dict[str, np.ndarray]:
        """Every output by name; float batches (data layout) in, chunked to the model's static batch."""
        if self.interpreter is None:
            raise RuntimeError("activate() first")
        batch = feeds(x, self.inputs)
        n = len(next(iter(batch.values())))
        if n % self.batch:
            raise ValueError(f"batch {n} is not a multiple of the model's batch {self.batch}")
        parts = [self._invoke({k: v[i:i + self.batch] for k, v in batch.items()}) for i in range(0, n, self.batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.outputs}

    def infer(self, x: Any) -> np.ndarray:
        """The first output of :meth:`run`."""
        return next(iter(self.run(x).values()))

    def deactivate(self) -> None:
        """Release the interpreter."""
        self.interpreter = None
