"""Runners: activate / infer / deactivate, one module per runtime, imported lazily.

A runner module defines ``Runner(run_dir, config, threads)`` with ``activate()``,
``run(feeds) -> outputs`` (input name -> float32 batch in, every output name -> float32 out, the
model's ONNX names whatever the runtime calls them), ``infer(x)`` (:func:`feeds` of ``x`` in,
the first output out: what timing and one-output callers use), ``deactivate()``, and after
``activate()`` the lists ``inputs`` and ``outputs``; plus a module function
``runtime_version() -> str``. The host uses the same classes for its numeric checks, so what is
checked is what runs on the device.

Config keys every runner reads: ``inputs`` and ``outputs`` (ONNX names, in order); a runtime
whose tensors are named otherwise maps them (ncnn's ``blobs``, TFLite's signature order).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

RUNNERS = {
    "onnxruntime": ".onnxruntime",
    "tflite": ".tflite",
    "ncnn": ".ncnn",
    "tensorrt": ".tensorrt",
}


def load_runner_module(name: str) -> ModuleType:
    """The runner module for ``name`` (raises KeyError for an unknown runner)."""
    return importlib.import_module(RUNNERS[name], __name__)


def io_names(config: dict[str, Any], key: str) -> list[str] | None:
    """``config[key + "s"]`` (the ONNX names in order), or the one ``config[key]`` older configs
    carry, or None (the runtime's own order then names them)."""
    names = config.get(f"{key}s")
    if names:
        return [str(n) for n in names]
    return [str(config[key])] if config.get(key) else None


def feeds(x: Any, inputs: list[str]) -> dict[str, np.ndarray]:
    """``x`` as input name -> float32 array: a dict as it is, an array as the only input."""
    if isinstance(x, dict):
        missing = [n for n in inputs if n not in x]
        if missing:
            raise ValueError(f"inputs {missing} missing from the samples (got {sorted(x)})")
        return {n: np.ascontiguousarray(x[n], dtype=np.float32) for n in inputs}
    if len(inputs) != 1:
        raise ValueError(f"the model takes inputs {inputs}; pass input name -> array")
    return {inputs[0]: np.ascontiguousarray(x, dtype=np.float32)}
