"""ncnn runner: drives ``ncnn.Net`` on the CPU (numpy and the ``ncnn`` wheel only).

``config`` (written by pipeline/backends/ncnn at conversion time, from the .param file)::

    {"param": "model.param", "bin": "model.bin",
     "input": "in0", "output": "out0",     # blob names read from the .param, never guessed
     "output_shape": [10],                 # per-sample output shape (the model's, minus batch)
     "fp16": false,                        # ncnn fp16 storage / packed / arithmetic options
     "int8": false}                        # int8 inference for layers that carry int8 scales

ncnn has no batch dimension: each sample of a batch is run through its own extractor and the
outputs are stacked. Samples are passed in the model's own layout with the batch axis dropped
(an ONNX NCHW input becomes ncnn's c, h, w).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def runtime_version() -> str:
    """``ncnn X`` (the wheel's version)."""
    import ncnn

    return f"ncnn {getattr(ncnn, '__version__', 'unknown')}"


class Runner:
    """One ncnn param/bin pair, light mode, ``threads`` worker threads."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.param = Path(run_dir) / config["param"]
        self.bin = Path(run_dir) / config["bin"]
        self.input = config["input"]
        self.output = config["output"]
        self.output_shape = tuple(int(d) for d in config.get("output_shape") or ())
        self.fp16 = bool(config.get("fp16", False))
        self.int8 = bool(config.get("int8", False))
        self.light_mode = bool(config.get("light_mode", True))
        self.threads = threads
        self.net: Any = None

    def activate(self) -> None:
        """Create the net with the precision options, then load param and bin."""
        import ncnn

        net = ncnn.Net()
        opt = net.opt
        opt.num_threads = self.threads
        # light mode frees each intermediate blob once consumed: lower peak memory on the device
        opt.lightmode = self.light_mode
        # ncnn turns fp16 on by default where the CPU has it (ARMv8.2 asimdhp); an fp32 or int8
        # artifact must switch it off explicitly or the device would compute in half precision.
        opt.use_fp16_storage = self.fp16
        opt.use_fp16_packed = self.fp16
        opt.use_fp16_arithmetic = self.fp16
        opt.use_int8_inference = self.int8
        opt.use_vulkan_compute = False
        if net.load_param(str(self.param)) != 0:
            raise RuntimeError(f"ncnn could not load {self.param} (unknown layer type or bad syntax)")
        if net.load_model(str(self.bin)) != 0:
            raise RuntimeError(f"ncnn could not load {self.bin} (weights do not match the param file)")
        self.net = net

    def _one(self, sample: np.ndarray) -> np.ndarray:
        import ncnn

        data = np.ascontiguousarray(sample, dtype=np.float32)
        ex = self.net.create_extractor()
        ex.set_light_mode(self.light_mode)
        # ncnn.Mat wraps ``data`` without copying: ``data`` must outlive the extraction
        mat = ncnn.Mat(data)
        ex.input(self.input, mat)
        ret, out = ex.extract(self.output)
        if ret != 0:
            raise RuntimeError(f"ncnn extract of blob {self.output!r} failed with code {ret}")
        result = np.array(out, dtype=np.float32)  # copy out of ncnn's allocator before it is reused
        del mat, data
        return result

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Float batch in (model layout), float outputs out, shape (batch, *output_shape)."""
        if self.net is None:
            raise RuntimeError("activate() first")
        x = np.asarray(x, dtype=np.float32)
        outs = [self._one(x[i]) for i in range(x.shape[0])]
        shape = self.output_shape or outs[0].shape
        return np.stack([o.reshape(shape) for o in outs])

    def deactivate(self) -> None:
        """Release the net (its weights and allocators)."""
        if self.net is not None:
            self.net.clear()
        self.net = None
