"""ncnn runner: drives ``ncnn.Net`` on the CPU (numpy and the ``ncnn`` wheel only).

``config`` (written by pipeline/backends/ncnn at conversion time, from the .param file)::

    {"param": "model.param", "bin": "model.bin",
     "inputs": ["image", "extra"], "outputs": ["logits"],   # the model's ONNX names, in order
     "blobs": {"image": "in0", "extra": "in1", "logits": "out0"},  # read from the .param, never guessed
     "output_shapes": {"logits": [10]},    # per-sample output shapes (the model's, minus batch)
     "fp16": false,                        # ncnn fp16 storage / packed / arithmetic options
     "int8": false}                        # int8 inference for layers that carry int8 scales

Older configs name one ``input`` and ``output`` blob and one ``output_shape``.

ncnn has no batch dimension: each sample of a batch is run through its own extractor and the
outputs are stacked. Samples are passed in the model's own layout with the batch axis dropped
(an ONNX NCHW input becomes ncnn's c, h, w).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import feeds, io_names


def runtime_version() -> str:
    """``ncnn X`` (the wheel's version)."""
    import ncnn

    return f"ncnn {getattr(ncnn, '__version__', 'unknown')}"


class Runner:
    """One ncnn param/bin pair, light mode, ``threads`` worker threads."""

    def __init__(self, run_dir: Path, config: dict[str, Any], threads: int) -> None:
        self.param = Path(run_dir) / config["param"]
        self.bin = Path(run_dir) / config["bin"]
        self.inputs = io_names(config, "input") or []
        self.outputs = io_names(config, "output") or []
        self.blobs = dict(config.get("blobs") or {})  # without it the names are the blobs
        shapes = config.get("output_shapes") or ({self.outputs[0]: config["output_shape"]}
                                                 if config.get("output_shape") else {})
        self.output_shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
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

    def _one(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ncnn

        ex = self.net.create_extractor()
        ex.set_light_mode(self.light_mode)
        # ncnn.Mat wraps the data without copying: ``keep`` holds it until the extraction is done
        keep = []
        for name, arr in sample.items():
            data = np.ascontiguousarray(arr, dtype=np.float32)
            mat = ncnn.Mat(data)
            keep.append((data, mat))
            ex.input(self.blobs.get(name, name), mat)
        result = {}
        for name in self.outputs:
            blob = self.blobs.get(name, name)
            ret, out = ex.extract(blob)
            if ret != 0:
                raise RuntimeError(f"ncnn extract of blob {blob!r} (output {name!r}) failed with code {ret}")
            result[name] = np.array(out, dtype=np.float32)  # copy out of ncnn's allocator before it is reused
        del keep
        return result

    def run(self, x: Any) -> dict[str, np.ndarray]:
        """Every output by name, (batch, *output shape), for a batch (model layout) per input."""
        if self.net is None:
            raise RuntimeError("activate() first")
        batch = feeds(x, self.inputs)
        n = len(next(iter(batch.values())))
        outs = [self._one({k: v[i] for k, v in batch.items()}) for i in range(n)]
        return {name: np.stack([o[name].reshape(self.output_shapes.get(name) or o[name].shape) for o in outs])
                for name in self.outputs}

    def infer(self, x: Any) -> np.ndarray:
        """The first output of :meth:`run`."""
        return next(iter(self.run(x).values()))

    def deactivate(self) -> None:
        """Release the net (its weights and allocators)."""
        if self.net is not None:
            self.net.clear()
        self.net = None
