"""TensorRT runner: deserializes the engine and runs it through torch's CUDA tensors.

The engine is built on this device by the agent's prepare step (:func:`build_artifact`, see
trt_build.py) and cached under ``$EDGESHIP_DEVICE_ROOT/engines``; :meth:`Runner.activate` finds it
from the config and this device's TensorRT version and GPU. On Jetson images PyTorch for JetPack
ships CUDA-enabled; using its tensors for device memory avoids another CUDA binding. Only runs
where TensorRT and a GPU exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import device_build, trt_build
from . import feeds, io_names


def runtime_version() -> str:
    import tensorrt

    return tensorrt.__version__


class Runner:
    """One engine; ``config``: {"onnx", "inputs": [names], "outputs": [names], "precision", ...}."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.config = config
        self.inputs = io_names(config, "input") or []
        self.outputs = io_names(config, "output") or []
        self.engine = None
        self.context = None

    def activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:  # e.g. an engine built with trtexec: running it needs the Python module
            raise device_build.Unavailable(trt_build.not_installed()) from None
        path = device_build.cached_artifact(self.config, build_identity(self.config))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()

    def run(self, x: Any) -> dict[str, np.ndarray]:
        """Every output by name: inputs copied to the GPU, shapes set, one enqueue, outputs copied back."""
        import torch

        assert self.context is not None, "activate() first"
        keep = []  # the device tensors must outlive the enqueue
        for name, arr in feeds(x, self.inputs).items():
            inp = torch.from_numpy(arr).cuda()
            self.context.set_input_shape(name, tuple(inp.shape))
            self.context.set_tensor_address(name, inp.data_ptr())
            keep.append(inp)
        outs = {}
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {name: out.cpu().numpy() for name, out in outs.items()}

    def infer(self, x: Any) -> np.ndarray:
        return next(iter(self.run(x).values()))

    def deactivate(self) -> None:
        self.context = None
        self.engine = None


def build_identity(config: dict[str, Any]) -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability (Unavailable naming this host if missing)."""
    return trt_build.identity()


def build_artifact(run_dir: Path, config: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    """Build the engine from the shipped ONNX (QDQ for int8) with the run's precision and options."""
    return trt_build.build(Path(run_dir) / config["onnx"], Path(out_dir) / config["device_build"]["artifact"], config)
