"""TFLite: TensorFlow-style SAME padding (``ZeroPad2d`` + VALID conv) is folded into the convs.

A small CNN padded the way EfficientNet-Lite pads (asymmetric pads before stride-2 convs, a 5x5
depthwise among them) goes through the real litert-torch conversion; the model as converted is
captured before the fold and both run on the real LiteRT interpreter: the same outputs, bit for
bit, with the PAD and TRANSPOSE ops gone, and a pad that is not SAME's left where it was; the op
coverage report counts the layout copies left on int8 tensors.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.backends.coverage import artifact_coverage, coverage_line, tflite_coverage
from pipeline.backends.tflite import padfold
from pipeline.registry import get_backend
from tests.backends.helpers import digits, make_context

NAME = "tflite"


def same_padded_cnn() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 16, 3, stride=2), nn.ReLU6(),              # 28 -> 14, SAME
        nn.Conv2d(16, 32, 1), nn.ReLU6(),
        nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(32, 32, 5, stride=2, groups=32), nn.ReLU6(),  # 14 -> 7, SAME
        nn.ZeroPad2d((2, 0, 2, 0)), nn.Conv2d(32, 16, 3), nn.ReLU(),                        # not SAME: kept
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).eval()


def rgb_digits(n: int, offset: int = 0) -> np.ndarray:
    """Real MNIST digits as 3-channel images (a 1-channel stem's layout change is a RESHAPE)."""
    return np.repeat(digits(n, offset), 3, axis=1)


def _ops(model: bytes) -> collections.Counter:
    from ai_edge_litert.interpreter import Interpreter

    return collections.Counter(o["op_name"] for o in Interpreter(model_content=model)._get_ops_details())


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    got = []
    for sample in x:
        it.set_tensor(inp["index"], sample[None].astype(np.float32))
        it.invoke()
        got.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(got)


def test_same_pads_match_tensorflow() -> None:
    assert padfold.same_pads(224, 3, 2, 1) == [0, 1]   # EfficientNet's stem
    assert padfold.same_pads(56, 5, 2, 1) == [1, 2]    # a 5x5 stride-2 depthwise
    assert padfold.same_pads(14, 3, 1, 1) == [1, 1]
    assert padfold.same_pads(7, 3, 1, 2) == [2, 2]     # dilation 2
    assert padfold.same_pads(113, 3, 2, 1) == [1, 1]   # odd size: symmetric


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fold_keeps_outputs_and_drops_the_pad_chains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     precision: str) -> None:
    before: dict[str, bytes] = {}
    real = padfold.fold_pads

    def spy(model: bytes) -> tuple[bytes, int]:
        before["model"] = model
        return real(model)

    monkeypatch.setattr(padfold, "fold_pads", spy)
    ctx = make_context(tmp_path, NAME, same_padded_cnn, rgb_digits(64), rgb_digits(16, offset=64))
    ctx.spec.calibration.fallback = False  # full integer: the fallback would keep layers of this toy float
    art = get_backend(NAME).convert(ctx, precision)
    after = (art.workdir / "model.tflite").read_bytes()
    ops_before, ops_after = _ops(before["model"]), _ops(after)
    # litert-torch keeps every pad of the int8 graph in NCHW between two transposes (in the fp32
    # graph only the stem's, on the NCHW input); the two SAME ones fold into their convs, and the
    # (2, 0) pad, which no conv padding expresses, stays, on the NHWC tensor without its transposes
    int8 = precision == "int8"
    assert ops_before["PAD"] == (3 if int8 else 2), ops_before
    assert art.info["pads_folded"] == {"into_conv": 2 if int8 else 1, "to_nhwc": 1 if int8 else 0}
    assert ops_after["PAD"] == 1, ops_after
    # what stays: the input's NCHW -> NHWC and the one before the classifier's flatten
    assert ops_after["TRANSPOSE"] == 2 and ops_before["TRANSPOSE"] == (6 if int8 else 2), ops_before
    assert ops_after["CONV_2D"] == ops_before["CONV_2D"] and ops_after["DEPTHWISE_CONV_2D"] == 1
    if int8:  # the op coverage names what is left: the input's transpose, the flatten's, the (2, 0) pad
        (tmp_path / "before.tflite").write_bytes(before["model"])
        assert tflite_coverage(tmp_path / "before.tflite").int8_layout_ops == {"TRANSPOSE": 6, "PAD": 3}
        cov = artifact_coverage(art.runner, art.workdir, art.runner_config)
        assert cov["int8_layout_ops"] == {"TRANSPOSE": 2, "PAD": 1} and cov["float_data_ops"] == {}, cov
        assert coverage_line(cov).endswith("; int8 layout copies: TRANSPOSE x2, PAD x1")
    x = rgb_digits(16, offset=100)
    np.testing.assert_array_equal(_run(after, x), _run(before["model"], x))


def test_nothing_to_fold_returns_the_same_bytes() -> None:
    import torch
    from torch import nn

    litert_torch = pytest.importorskip("litert_torch")
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).eval()
    tflite = bytes(litert_torch.convert(model, (torch.zeros(1, 1, 8, 8),)).model_content())
    assert padfold.fold_pads(tflite) == (tflite, {"into_conv": 0, "to_nhwc": 0})
