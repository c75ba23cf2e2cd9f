"""TensorRT, host side: the conversion needs no TensorRT and no GPU (the engine is built on the
device, see tests/device_build and tests/tensorrt); what it ships is what the board builds from."""

from __future__ import annotations

import pytest

from pipeline.cache import sha256_file
from pipeline.registry import get_backend


def test_available_without_tensorrt_or_gpu() -> None:
    ok, reason = get_backend("tensorrt").available()
    assert ok, reason  # onnx + onnxruntime are all the host's half needs
    assert get_backend("tensorrt").version()["engine"] == "built on the device"


@pytest.mark.slow
@pytest.mark.backend("tensorrt")
def test_tensorrt_convert_ships_onnx_qdq_and_cache(tmp_path, mnist_spec) -> None:
    """fp16 ships the fp32 ONNX with the precision for the board's builder; int8 ships the QDQ
    model (TensorRT explicit quantization) and the calibration cache, both checked on the host."""
    from calibration.writers.tensorrt import check_tensorrt_rules, read_calibration_cache

    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_target

    target = load_target("local").model_copy(deep=True)
    target.builds = target.builds[:1]
    target.builds[0].backend = "tensorrt"
    target.builds[0].precisions = ["fp16", "int8"]
    result = build(mnist_spec, target, tmp_path / "out", cache=Cache(tmp_path / "cache"), log=lambda _m: None)
    arts = {a.precision: a for a in result.artifacts}
    assert arts["fp16"].files == ["model.onnx"] and arts["fp16"].runner_config["precision"] == "fp16"
    assert arts["int8"].files == ["model.qdq.onnx", "calibration.cache"]
    check_tensorrt_rules(arts["int8"].workdir / "model.qdq.onnx")
    _, scales = read_calibration_cache(arts["int8"].workdir / "calibration.cache")
    assert len(scales) == arts["int8"].info["calibration_cache"]["tensors"] > 0
    for art in arts.values():
        assert art.info["check"]["top1_agreement"] >= 95.0
        onnx_file = art.workdir / art.runner_config["onnx"]
        assert art.runner_config["device_build"]["onnx_sha256"] == sha256_file(onnx_file)
        assert not (art.workdir / "model.engine").exists()
