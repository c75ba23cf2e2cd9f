"""TFLite int8 ADD / MUL (issue 15): a residual ADD of two quantized tensors runs in int8, its
output takes the calibration plan's range like a conv output, and the float-layer fallback still
reads a float tensor when an ADD produces it. Real litert-torch conversions of a tiny
MobileNetV2-style net on real MNIST digits, coverage read from the written flatbuffer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.backends.coverage import artifact_coverage
from pipeline.registry import get_backend
from tests.backends.helpers import digits, make_context, run_artifact, with_bn_statistics

NAME = "tflite"
pytestmark = [pytest.mark.slow, pytest.mark.backend(NAME)]


def residual_cnn() -> Any:
    """Stem Conv+BN+ReLU6; an inverted-residual block (expand, depthwise, project) added to its
    input; a Conv+BN block whose ADD a ReLU follows; a gate multiplying two activations; GAP, Linear."""
    import torch
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self, body: nn.Module, relu: bool = False) -> None:
            super().__init__()
            self.body, self.relu = body, relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + self.body(x)
            return torch.relu(y) if self.relu else y

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
            self.block1 = Residual(nn.Sequential(
                nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)))
            self.block2 = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)), relu=True)
            self.gate = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.block2(self.block1(self.stem(x)))
            return self.head((x * self.gate(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    return with_bn_statistics(model)


def _convert(tmp: Path, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], Counter]:
    from ai_edge_litert.interpreter import Interpreter

    tmp.mkdir()
    ctx = make_context(tmp, NAME, residual_cnn, digits(40), digits(16, offset=40), options)
    art = get_backend(NAME).convert(ctx, "int8")
    cov = artifact_coverage(art.runner, art.workdir, art.runner_config)
    ops = Counter(d["op_name"] for d in Interpreter(model_path=str(art.workdir / "model.tflite"))._get_ops_details())
    return art, cov, ops


@pytest.fixture(scope="module")
def all_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Counter]:
    return _convert(tmp_path_factory.mktemp("residual") / "int8")


def test_residual_add_and_mul_run_in_int8_with_the_plans_ranges(all_int8: tuple[Any, dict[str, Any], Counter]) -> None:
    art, cov, ops = all_int8
    # both ADDs (one with the ReLU fused) and the MUL are integer ops: no float op and no
    # DEQUANTIZE / QUANTIZE left inside the graph (each float ADD used to cost three)
    assert ops["ADD"] == 2 and ops["MUL"] == 1, ops
    assert cov["float"] == 0 and cov["qdq_left"] == 0 and cov["int8"] == cov["compute_ops"], cov
    notes = art.info["calibration"]["notes"]
    assert notes["int8_add_mul"] == 3 and notes["kept_float"] == [], notes
    # every activation observer, the ADDs' and the MUL's outputs included, paired with its ONNX
    # tensor and took the calibration plan's range
    shared = notes["shared_ranges"]
    assert shared["from_plan"] == shared["observers"] and shared["observed_by_pt2e"] == [], shared
    check = art.info["check"]
    assert check["sqnr_db"] >= 25.0 and check["top1_agreement"] >= 87.5, check


def test_a_float_layer_reading_an_add_keeps_that_add_float(all_int8: tuple[Any, dict[str, Any], Counter],
                                                           tmp_path: Path) -> None:
    import torch

    plain = all_int8[0]
    art, cov, ops = _convert(tmp_path / "fallback", {"float_layers": ["block2.body.0"]})
    notes = art.info["calibration"]["notes"]
    # the float conv reads block1's ADD output, so that ADD stays float with it (a float layer
    # reads a float tensor); block2's ADD and the MUL still run in int8
    assert notes["kept_float"] == ["block1/add", "block2.body.0"] and notes["float_producers"] == ["block1/add"], notes
    assert cov["float_ops"] == {"ADD": 1, "CONV_2D": 1} and cov["int8"] == cov["compute_ops"] - 2, cov
    assert notes["int8_add_mul"] == 2 and ops["ADD"] == 2, (notes, ops)
    x = digits(16, offset=100)
    with torch.no_grad():
        fp32 = residual_cnn()(torch.from_numpy(x)).numpy()
    for a in (plain, art):  # the written model stays close to fp32 on unseen digits
        got = run_artifact(a, x)
        assert 10 * np.log10(np.sum(fp32 ** 2) / np.sum((got - fp32) ** 2)) >= 25.0
