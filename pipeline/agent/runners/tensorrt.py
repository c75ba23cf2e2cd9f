"""TensorRT runner: deserializes the engine and runs it through torch's CUDA tensors.

On Jetson images PyTorch for JetPack ships CUDA-enabled; using its tensors for device memory
avoids another CUDA binding. Only runs where TensorRT and a GPU exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def runtime_version() -> str:
    import tensorrt

    return tensorrt.__version__


class Runner:
    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.path = Path(run_dir) / config["engine"]
        self.input = config["input"]
        self.output = config["output"]
        self.engine = None
        self.context = None

    def activate(self) -> None:
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        self.context = self.engine.create_execution_context()

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        assert self.context is not None, "activate() first"
        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(inp.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input, inp.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()

    def deactivate(self) -> None:
        self.context = None
        self.engine = None
