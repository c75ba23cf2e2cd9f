"""ncnn backend: real pnnx conversions and edgeship-written INT8 models, run on the real ncnn.

A small Conv+BN+ReLU CNN (with a depthwise Conv+BN+ReLU6 block) on real MNIST digits, through a
BuildContext built by hand; then the MNIST workload through the whole build pipeline, whose
int8 must stay within 1.0 pp of fp32. EfficientNet-Lite0 (all precisions) runs only with
EDGESHIP_FULL_BACKEND_TESTS=1 (minutes on 2 cores).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline.backends.base import Artifact
from pipeline.errors import ConversionError
from pipeline.registry import get_backend
from tests.backends.helpers import build_and_evaluate, converter, digits, make_context, planted_context, run_artifact, tiny_cnn

NAME = "ncnn"
FULL = os.environ.get("EDGESHIP_FULL_BACKEND_TESTS") == "1"
convert = converter(NAME)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_precisions_match_onnxruntime(convert: Callable[..., Artifact], precision: str) -> None:
    art = convert(precision)
    assert sorted(art.files) == ["model.bin", "model.param"]
    assert sorted(p.name for p in art.workdir.iterdir()) == ["model.bin", "model.param"]  # no pnnx leftovers
    cfg = art.runner_config
    assert (cfg["inputs"], cfg["outputs"], cfg["output_shapes"]) == (["input"], ["logits"], {"logits": [10]})
    assert cfg["blobs"] == {"input": "in0", "logits": "out0"} and (cfg["input"], cfg["output"]) == ("in0", "out0")
    assert cfg["fp16"] is (precision == "fp16") and cfg["int8"] is False
    assert art.info["check"]["rel_diff"] < {"fp32": 1e-4, "fp16": 2e-3}[precision]
    # fp16 stores the weights as half floats: the .bin is about half the fp32 one
    if precision == "fp16":
        ratio = (art.workdir / "model.bin").stat().st_size / (convert("fp32").workdir / "model.bin").stat().st_size
        assert 0.4 < ratio < 0.6


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_model_written_from_calibration(convert: Callable[..., Artifact]) -> None:
    from pipeline.backends.ncnn import paramfile

    art = convert("int8", int8_depthwise="int8")  # every weighted layer int8, the depthwise one too
    layers = paramfile.read(art.workdir / "model.param").layers
    quantized = {q.name: q.type for q in layers if q.params.get(8) in ("1", "101")}
    assert sorted(quantized.values()) == ["Convolution", "Convolution", "ConvolutionDepthWise", "InnerProduct"]
    info = art.info["calibration"]
    assert info["notes"]["quantized_layers"] == 4 and info["notes"]["kept_float"] == []
    assert info["method"] in info["method_scores"] and set(info["method_scores"]) == {"minmax", "percentile",
                                                                                        "entropy", "mse"}
    check = art.info["check"]
    assert check["sqnr_db"] >= 25.0 and check["top1_agreement"] >= 90.0
    assert art.runner_config["int8"] is True
    # int8 weights: the .bin shrinks to about a quarter of the fp32 one
    assert (art.workdir / "model.bin").stat().st_size < 0.4 * (convert("fp32").workdir / "model.bin").stat().st_size


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_conv_read_only_by_an_int8_conv_requantizes(convert: Callable[..., Artifact]) -> None:
    """The depthwise conv feeds the next conv alone: it writes int8 in that conv's scale (8=101,
    a top scale), and the outputs are those of dequantizing to float and quantizing again."""
    from pipeline.backends.checks import run_runner
    from pipeline.backends.ncnn import int8, paramfile
    from pipeline.backends.ncnn.weights import read_weights

    art, fp32 = convert("int8", int8_depthwise="int8"), convert("fp32")
    params = {q.name: q for q in paramfile.read(art.workdir / "model.param").layers}
    scales = art.info["calibration"]["notes"]["scales"]
    fused = {n: s["requantized_for"] for n, s in scales.items() if "requantized_for" in s}
    assert len(fused) == 1
    (dw, reader), = fused.items()
    assert params[dw].type == "ConvolutionDepthWise" and params[dw].params[8] == "101"
    assert params[reader].type == "Convolution" and params[reader].params[8] == "1"
    # everything else dequantizes: the first conv feeds a MaxPool, the last one a pooling
    assert sorted(q.params.get(8) for q in params.values() if q.params.get(8)) == ["1", "1", "1", "101"]
    # the same model written without requantize: same numbers up to float rounding
    model = paramfile.read(fp32.workdir / "model.param")
    weights = read_weights(model, (fp32.workdir / "model.bin").read_bytes())
    thr = {s["bottom"]: s["threshold"] for s in scales.values()}
    quantize = [q for q in model.layers if q.name in scales]
    x = digits(32, offset=96)
    outs = {}
    for fuse in (True, False):
        param, blob, _ = int8.write(model, weights, quantize, thr, requantize=fuse)
        folder = art.workdir.parent / f"requantize-{fuse}"
        folder.mkdir(exist_ok=True)
        param.write(folder / "model.param")
        (folder / "model.bin").write_bytes(blob)
        outs[fuse] = run_runner(NAME, folder, art.runner_config, x, 1)
    assert np.abs(outs[True] - outs[False]).max() <= 1e-3 * np.abs(outs[False]).max()


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_x86_keeps_its_slow_int8_depthwise_float(convert: Callable[..., Artifact]) -> None:
    """On an x86_64 target the default keeps the 3x3 stride 1 depthwise conv float (ncnn's x86 int8
    kernel is slower than fp32 there); the report says why and the other layers stay int8."""
    cal = convert("int8").info["calibration"]
    kept = cal["notes"]["kept_float"]
    assert [(k["type"], k["reason"].split(":")[0]) for k in kept] == [("ConvolutionDepthWise", "faster in float on x86")]
    assert cal["notes"]["quantized_layers"] == 3 and kept[0]["name"] not in cal["notes"]["scales"]
    float_dw = convert("int8", int8_depthwise="float").info["calibration"]["notes"]["kept_float"]
    assert [k["reason"] for k in float_dw] == ["depthwise kept float (option int8_depthwise: float)"]


_DEPTHWISE_PARAM = """7767517
6 6
Input                    in0                      0 1 in0
ConvolutionDepthWise     dw3s1                    1 1 in0 1 0=8 1=3 11=3 3=1 13=1 4=1 5=1 6=72 7=8
ConvolutionDepthWise     dw3s2                    1 1 1 2 0=8 1=3 11=3 3=2 13=2 4=1 5=1 6=72 7=8
ConvolutionDepthWise     dw5s2                    1 1 2 3 0=8 1=5 11=5 3=2 13=2 4=2 5=1 6=200 7=8
ConvolutionDepthWise     grouped                  1 1 3 4 0=8 1=3 11=3 4=1 5=1 6=144 7=4
Convolution              pw                       1 1 4 5 0=8 1=1 5=1 6=64
"""


def test_depthwise_policy_keeps_all_but_3x3_stride2_depthwise_float_on_x86() -> None:
    from types import SimpleNamespace

    from pipeline.backends.ncnn import int8, paramfile
    from pipeline.backends.ncnn.quantize import depthwise_policy
    from pipeline.spec import BuildSpec, TargetSpec

    model = paramfile.parse(_DEPTHWISE_PARAM)
    quantized = {p: [q.name for q in int8.plan(model, depthwise=p).quantize] for p in int8.DEPTHWISE_POLICIES}
    assert quantized == {"int8": ["dw3s1", "dw3s2", "dw5s2", "grouped", "pw"], "float": ["pw"],
                         "x86": ["dw3s2", "grouped", "pw"]}
    kept = int8.plan(model, frozenset({"dw3s2"}), depthwise="x86").kept_float
    assert {k["name"]: k["reason"] for k in kept}["dw3s2"] == "kept float on request"  # float_layers come first
    with pytest.raises(ValueError, match="depthwise policy"):
        int8.plan(model, depthwise="auto")

    def policy(arch: str, **options: str) -> str:
        build = BuildSpec(backend=NAME, precisions=["int8"], options=options)
        return depthwise_policy(SimpleNamespace(build=build, target=TargetSpec(name="t", arch=arch, builds=[build])))

    assert (policy("x86_64"), policy("aarch64"), policy("armv7l")) == ("x86", "int8", "int8")
    assert (policy("x86_64", int8_depthwise="int8"), policy("aarch64", int8_depthwise="float")) == ("int8", "float")


def test_ncnn_int8_cache_key_holds_the_target_arch(tmp_path: Path) -> None:
    """int8 artifacts differ per arch (int8_depthwise: auto), so an x86_64 and an aarch64 target
    must not share one; fp32 and the other backends' int8 still do."""
    from pipeline.backends.base import Samples
    from pipeline.build import _convert_key, _Run
    from pipeline.cache import Cache
    from pipeline.spec import load_spec, load_target

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "mnist.yaml")
    calib = Samples({"input": np.zeros((1, 1, 28, 28), np.float32)}, None, ["0"], "sha")
    keys = {}
    for arch in ("x86_64", "aarch64"):
        target = load_target("local").model_copy(deep=True)
        target.arch = arch
        run = _Run(spec, Cache(tmp_path), lambda s: None, target=target)
        for b in target.builds:
            for p in ("fp32", "int8"):
                keys[arch, b.backend, p] = _convert_key(run, get_backend(b.backend), b, p, "onnx", "w", calib)
    assert keys["x86_64", NAME, "int8"] != keys["aarch64", NAME, "int8"]
    assert keys["x86_64", NAME, "fp32"] == keys["aarch64", NAME, "fp32"]
    assert keys["x86_64", "onnxruntime", "int8"] == keys["aarch64", "onnxruntime", "int8"]


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_biases_carry_the_calibration_bias_correction(convert: Callable[..., Artifact]) -> None:
    """int8 layers get the bias-corrected biases of the ONNX Runtime path's plan, not the fp32 ones."""
    art = convert("int8")
    corr = art.info["calibration"]["notes"]["bias_correction"]
    assert corr["applied"] is True and corr["ncnn_layers"] == 4 == corr["onnx_biases_corrected"], corr
    assert all(s["bias_corrected"] for s in art.info["calibration"]["notes"]["scales"].values())
    # both .bin files end with the InnerProduct 16 -> 10; int8: ..., 10 biases, 10 weight scales,
    # 1 input scale; fp32: ..., 10 biases
    int8_bin, fp32_bin = (art.workdir / "model.bin").read_bytes(), (convert("fp32").workdir / "model.bin").read_bytes()
    b_int8 = np.frombuffer(int8_bin[-(4 * 10 + 4 * 10 + 4):-(4 * 10 + 4)], "<f4")
    b_fp32 = np.frombuffer(fp32_bin[-40:], "<f4")
    assert not np.array_equal(b_int8, b_fp32)
    assert np.abs(b_int8 - b_fp32).max() < 0.1 * np.abs(b_fp32).max() + 1e-3  # a correction, not new values


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_bias_correction_refuses_conversions_that_differ_beyond_biases(convert: Callable[..., Artifact]) -> None:
    from pipeline.backends.ncnn import paramfile
    from pipeline.backends.ncnn.correction import bias_overrides
    from pipeline.backends.ncnn.weights import Buffer, read_weights

    art = convert("fp32")
    model = paramfile.read(art.workdir / "model.param")
    weights = read_weights(model, (art.workdir / "model.bin").read_bytes())
    assert bias_overrides(model, weights, model, weights) == {}
    name = next(n for n, bufs in weights.items() if len(bufs) == 2)
    w, b = weights[name]
    moved = {**weights, name: [w, Buffer(b.label, b.tagged, b.data + 0.5)]}
    assert list(bias_overrides(model, weights, model, moved)) == [name]
    changed = {**weights, name: [Buffer(w.label, w.tagged, w.data * 2.0), b]}
    with pytest.raises(ValueError, match="buffer 'weight' differs"):
        bias_overrides(model, weights, model, changed)


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_layers_option_keeps_layers_float(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, NAME, tiny_cnn, digits(32), digits(8, offset=32),
                       {"float_layers": ["linear_5"], "int8_depthwise": "int8"})
    art = get_backend(NAME).convert(ctx, "int8")
    kept = art.info["calibration"]["notes"]["kept_float"]
    assert kept == [{"name": "linear_5", "type": "InnerProduct", "reason": "kept float on request"}]
    assert art.info["calibration"]["notes"]["quantized_layers"] == 3


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_check_fails_when_a_weight_is_corrupted(convert: Callable[..., Artifact], tmp_path: Path) -> None:
    from pipeline.backends.checks import check_outputs

    art = convert("int8")
    blob = bytearray((art.workdir / "model.bin").read_bytes())
    # the last layer (InnerProduct 16 -> 10) ends the .bin: tag, 160 int8 weights, 10 biases,
    # 10 weight scales, 1 input scale. Negate its weights: every logit flips sign.
    start = len(blob) - (4 + 160 + 4 * 10 + 4 * 10 + 4)
    assert struct.unpack_from("<I", blob, start)[0] == 0x000D4B38
    weights = np.frombuffer(bytes(blob[start + 4:start + 164]), np.int8)
    blob[start + 4:start + 164] = (-weights.astype(np.int16)).clip(-127, 127).astype(np.int8).tobytes()
    (tmp_path / "model.param").write_bytes((art.workdir / "model.param").read_bytes())
    (tmp_path / "model.bin").write_bytes(bytes(blob))
    x = digits(16, offset=64)
    broken = Artifact(art.backend, art.precision, tmp_path, art.files, art.runner, art.runner_config)
    with pytest.raises(ConversionError, match=r"ncnn int8: (SQNR|top-1)"):
        check_outputs(NAME, "int8", run_artifact(convert("fp32"), x), run_artifact(broken, x))


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_identity_gather_is_folded_for_ncnn(tmp_path: Path) -> None:
    """torch exports ``as_strided`` views as Gather(arange); ncnn has no Gather layer."""
    import torch
    import torch.nn as nn

    class StridedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).mean((2, 3))
            return self.fc(torch.as_strided(y, (1, 4), (4, 1)))

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return StridedHead().eval()

    ctx = make_context(tmp_path, NAME, factory, digits(8), digits(8, offset=8))
    art = get_backend(NAME).convert(ctx, "fp32")
    assert len(art.info["onnx_rewrites"]) == 1 and art.info["check"]["rel_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_mnist_int8_within_1pp_of_fp32(tmp_path: Path, mnist_spec: Any) -> None:
    acc = build_and_evaluate(NAME, mnist_spec, tmp_path, ["fp32", "fp16", "int8"])
    assert acc["fp32"] - acc["fp16"] <= 0.2 and acc["fp32"] - acc["int8"] <= 1.0, acc


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.skipif(not FULL, reason="minutes on 2 cores: set EDGESHIP_FULL_BACKEND_TESTS=1")
def test_efficientnet_lite0_all_precisions(tmp_path: Path) -> None:
    from pipeline.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "efficientnet_lite0.yaml")
    acc = build_and_evaluate(NAME, spec, tmp_path, ["fp32", "fp16", "int8"])  # ImageNet top-1, 400 images
    assert acc["fp32"] >= 85.0 and acc["fp32"] - acc["fp16"] <= 0.5 and acc["fp32"] - acc["int8"] <= 1.0, acc


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.parametrize("fallback", [True, False])
def test_fallback_keeps_the_planted_layer_float_to_meet_the_budget(tmp_path: Path, fallback: bool) -> None:
    ctx = planted_context(tmp_path, NAME, fallback)
    cal = get_backend(NAME).convert(ctx, "int8").info["calibration"]
    shared = cal["notes"]["shared_ranges"]
    assert shared["applied"] and shared["observed_on_ncnn"] == []
    if not fallback:  # the planted layer ruins the holdout: the report says so (and the gate fails it)
        assert cal["budget_met"] is False and cal["holdout"]["drop_pp"] > 10.0, cal["holdout"]
        assert "fallback is off" in cal["budget_reason"] and cal["fallback_layers"] == []
        return
    assert cal["budget_met"] is True and cal["holdout"]["drop_pp"] <= 10.0, cal
    float_layers = [f["name"] for f in cal["fallback_layers"]]
    # pnnx names the second Conv+ReLU (the one reading the planted channel) convrelu_1
    assert float_layers[0] == "convrelu_1" and len(float_layers) <= 2, cal["fallback_layers"]
    assert "convrelu_0" in cal["notes"]["scales"] and "convrelu_1" not in cal["notes"]["scales"]
    assert cal["fallback_tried"][-1][1] <= 10.0
