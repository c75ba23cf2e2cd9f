"""TensorRT: conversion needs TensorRT and an NVIDIA GPU; without them the test is skipped with
the backend's own reason, and the refusal itself is tested."""

from __future__ import annotations

import pytest

from pipeline.errors import BackendUnavailable
from pipeline.registry import get_backend, require_available


def test_unavailable_backend_is_refused_before_work() -> None:
    ok, reason = get_backend("tensorrt").available()
    if ok:
        pytest.skip("TensorRT is available here; the refusal path cannot be exercised")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        require_available(["onnxruntime", "tensorrt"])
    assert "GPU" in reason or "tensorrt" in reason


@pytest.mark.slow
@pytest.mark.tensorrt
@pytest.mark.backend("tensorrt")
def test_tensorrt_convert_mnist(tmp_path, mnist_spec) -> None:
    """Builds fp16 and int8 engines of the MNIST CNN and checks them (runs only with a GPU)."""
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_target

    target = load_target("local").model_copy(deep=True)
    target.builds[0].backend = "tensorrt"
    target.builds[0].precisions = ["fp16", "int8"]
    result = build(mnist_spec, target, tmp_path / "out", cache=Cache(tmp_path / "cache"))
    assert {a.precision for a in result.artifacts} == {"fp16", "int8"}
    for art in result.artifacts:
        assert art.info["check"]["top1_agreement"] >= 95.0
