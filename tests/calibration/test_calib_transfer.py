"""calibration.transfer: pairing another runtime's tensors with the ONNX tensors that hold the
same values, so one plan's ranges reach every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.transfer import match_tensors, onnx_activations


def test_pairs_by_value_not_by_name() -> None:
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    ours = {"conv_out": pre, "relu_out": np.maximum(pre, 0), "flat": pre.reshape(2, -1) * 3}
    theirs = {"blob7": np.maximum(pre, 0) + 1e-6, "blob3": pre.copy(), "nhwc": pre.transpose(0, 2, 3, 1).copy(),
              "unknown": rng.normal(size=(2, 4, 5, 5))}
    m = match_tensors(theirs, ours)
    # a ReLU output is not mistaken for its input (the negatives are half the signal)
    assert m.pairs == {"blob7": "relu_out", "blob3": "conv_out", "nhwc": "conv_out"}
    assert m.unmatched == ["unknown"]
    assert max(m.errors.values()) < 1e-5


def test_tolerance_refuses_near_misses() -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    assert match_tensors({"t": x * 1.01}, {"o": x}).unmatched == ["t"]  # 1 % off: another value
    assert match_tensors({"t": x * 1.01}, {"o": x}, tol=0.02).pairs == {"t": "o"}


def test_onnx_activations_returns_every_tensor_on_the_samples(tiny_cnn: Path) -> None:
    import onnx

    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    acts = onnx_activations(tiny_cnn, x)
    model = onnx.load(str(tiny_cnn))
    inp, out = model.graph.input[0].name, model.graph.output[0].name
    assert np.array_equal(acts[inp], x) and acts[out].shape[0] == 3
    assert len(acts) > len(model.graph.node) // 2
