"""ONNX Runtime runner (CPU execution provider).

With ``optimize_on_device`` (a ``device_build`` block in the config) the agent's prepare step has
saved the session's fully optimised graph for this device's CPU into the engine cache
(:func:`build_artifact`), and :meth:`Runner.activate` loads that file instead of the shipped one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import device_build
from . import feeds, io_names


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class Runner:
    """Runs one ONNX model. ``config``: {"model": file name, "inputs": [names], "outputs": [names]}."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.path = Path(run_dir) / config["model"]
        self.config = config
        self.inputs = io_names(config, "input") or []
        self.outputs = io_names(config, "output") or []
        self.threads = threads
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.path
        if self.config.get("device_build"):
            path = device_build.cached_artifact(self.config, build_identity(self.config))
            # optimised already, for this CPU: optimising again would only cost load time
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = self.inputs or [i.name for i in self.session.get_inputs()]
        self.outputs = self.outputs or [o.name for o in self.session.get_outputs()]

    def run(self, x: Any) -> dict[str, np.ndarray]:
        """Every output by name for ``x`` (input name -> batch, or the batch of a one-input model)."""
        assert self.session is not None, "activate() first"
        got = self.session.run(self.outputs, feeds(x, self.inputs))
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.outputs, got)}

    def infer(self, x: Any) -> np.ndarray:
        return next(iter(self.run(x).values()))

    def deactivate(self) -> None:
        self.session = None


def build_identity(config: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's version and this CPU: what the optimised graph is tied to."""
    try:
        import onnxruntime
    except ImportError:
        raise device_build.Unavailable(f"onnxruntime is not installed on {device_build.host_name()} "
                                       f"({device_build.python_desc()}); pip install onnxruntime") from None
    return {"onnxruntime": onnxruntime.__version__, **device_build.cpu_identity()}


def build_artifact(run_dir: Path, config: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    """Save the session's fully optimised (ORT_ENABLE_ALL) graph for this CPU into ``out_dir``."""
    import onnxruntime as ort

    src = Path(run_dir) / config["model"]
    out = Path(out_dir) / config["device_build"]["artifact"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    cpu = device_build.cpu_identity()["cpu"]
    log = (f"onnxruntime {ort.__version__}: {src.name} ({src.stat().st_size} bytes) -> {out.name} "
           f"({out.stat().st_size if out.is_file() else 0} bytes), ORT_ENABLE_ALL for {cpu}")
    return {"builder": f"onnxruntime {ort.__version__}", "log": log}
