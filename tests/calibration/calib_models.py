"""Tiny ONNX models built in code for the calibration tests (importable by a unique name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_cnn(path: Path, seed: int = 0, outlier_channel: float | None = None, batch: int | str = "N") -> Path:
    """x[N,3,8,8] -> Conv(3->8)+Relu -> Conv(8->8)+Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4).

    With ``outlier_channel`` = k, channel 0 of the first conv is scaled by k and the second
    conv's weights reading it by 1/k: the float model computes the same function family, but a
    per-tensor range on the second conv's input is dominated by channel 0, so quantizing that
    input wipes out the other seven channels. That plants one highly sensitive layer ("conv2").
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 8).astype(np.float32)
    w3 = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    b3 = np.zeros(4, np.float32)
    if outlier_channel is not None:
        w1[0] *= outlier_channel
        b1[0] = abs(b1[0]) * outlier_channel
        w2[:, 0] /= outlier_channel
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
