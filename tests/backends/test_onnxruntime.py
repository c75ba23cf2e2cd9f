"""ONNX Runtime backend: real conversions (fp32 copy, fp16, INT8 QDQ from edgeship's calibration)
run with the device runner on real MNIST digits, and the numeric check failing on a broken model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline.backends.base import Artifact
from pipeline.errors import ConversionError
from pipeline.registry import get_backend
from tests.backends.helpers import build_and_evaluate, converter, digits, make_context, run_artifact, tiny_cnn

NAME = "onnxruntime"
convert = converter(NAME)
pytestmark = [pytest.mark.backend(NAME)]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_conversions_match_the_fp32_reference(convert: Callable[..., Artifact], precision: str) -> None:
    import onnx

    art = convert(precision)
    x = digits(32, offset=100)
    ref = run_artifact(convert("fp32"), x)
    got = run_artifact(art, x)
    check = art.info["check"]
    model = onnx.load(str(art.workdir / art.files[0]))
    ops = {n.op_type for n in model.graph.node}
    if precision == "fp32":
        np.testing.assert_array_equal(got, ref)
    elif precision == "fp16":
        assert check["rel_diff"] < 2e-2 and check["top1_agreement"] == 100.0
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert check["sqnr_db"] > 15 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
        assert art.info["calibration"]["method"] in ("minmax", "percentile", "entropy", "mse")
    sizes = {p: (convert(p).workdir / convert(p).files[0]).stat().st_size for p in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < sizes["fp32"]  # (int8's Q/DQ overhead outweighs 4k weights; see test_deploy_local)


@pytest.mark.slow
def test_check_fails_when_the_model_diverges(tmp_path: Path) -> None:
    """The same conversion with a wrong fp32 reference must be refused, not shipped."""
    ctx = make_context(tmp_path, NAME, tiny_cnn, digits(32), digits(8, offset=32))
    ctx.reference = {k: v + np.float32(5.0) * np.sign(v) for k, v in ctx.reference.items()}
    with pytest.raises(ConversionError, match="onnxruntime fp32"):
        get_backend(NAME).convert(ctx, "fp32")


@pytest.mark.slow
def test_mnist_int8_within_budget(tmp_path: Path, mnist_spec: Any) -> None:
    top1 = build_and_evaluate(NAME, mnist_spec, tmp_path, ["fp32", "int8"])
    assert top1["fp32"] > 97.0 and top1["fp32"] - top1["int8"] <= 0.3


def test_available_and_versions() -> None:
    ok, reason = get_backend(NAME).available()
    assert ok, reason
    versions = get_backend(NAME).version()
    assert versions["onnxruntime"].count(".") >= 2 and "onnx" in versions
