"""ONNX Runtime runner (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class Runner:
    """Runs one ONNX model. ``config``: {"model": file name, "input": name, "output": name}."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.path = Path(run_dir) / config["model"]
        self.input = config.get("input")
        self.output = config.get("output")
        self.threads = threads
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        if self.input is None:
            self.input = self.session.get_inputs()[0].name
        if self.output is None:
            self.output = self.session.get_outputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        assert self.session is not None, "activate() first"
        out = self.session.run([self.output], {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def deactivate(self) -> None:
        self.session = None
