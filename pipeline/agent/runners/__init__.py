"""Runners: activate / infer / deactivate, one module per runtime, imported lazily.

A runner module defines ``Runner(run_dir, config, threads)`` with ``activate()``,
``infer(x) -> np.ndarray`` (float32 batch in, float32 outputs out) and ``deactivate()``, plus a
module function ``runtime_version() -> str``. The host uses the same classes for its numeric
checks, so what is checked is what runs on the device.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RUNNERS = {
    "onnxruntime": ".onnxruntime",
    "tflite": ".tflite",
    "ncnn": ".ncnn",
    "tensorrt": ".tensorrt",
}


def load_runner_module(name: str) -> ModuleType:
    """The runner module for ``name`` (raises KeyError for an unknown runner)."""
    return importlib.import_module(RUNNERS[name], __name__)
