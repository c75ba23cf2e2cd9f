"""TFLite / LiteRT backend: real litert-torch conversions, run on the real LiteRT interpreter.

A small Conv+BN+ReLU CNN (with a depthwise Conv+BN+ReLU6 block) on real MNIST digits, through a
BuildContext built by hand; then the MNIST workload through the whole build pipeline, whose
int8 must stay within 1.0 pp of fp32 on the evaluation split. EfficientNet-Lite0 takes minutes
per int8 conversion on 2 cores: it runs only with EDGESHIP_FULL_BACKEND_TESTS=1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline.backends.base import Artifact, BuildContext
from pipeline.errors import ConversionError
from pipeline.registry import get_backend
from tests.backends.helpers import build_and_evaluate, converter, digits, make_context, planted_context, run_artifact, tiny_cnn

NAME = "tflite"
slow_backend = [pytest.mark.slow, pytest.mark.backend(NAME)]
FULL = os.environ.get("EDGESHIP_FULL_BACKEND_TESTS") == "1"
convert = converter(NAME)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_precisions_match_onnxruntime(convert: Callable[..., Artifact], precision: str) -> None:
    art = convert(precision)
    assert art.files == ["model.tflite"] and (art.workdir / "model.tflite").is_file()
    tol = {"fp32": 1e-4, "fp16": 2e-3}[precision]
    assert art.info["check"]["rel_diff"] < tol
    assert art.runner_config["input_quant"] is None and art.runner_config["model_layout"] == "NCHW"
    # fp16: the conv / linear weights are really stored in half precision
    assert art.info["tensor_types"].get("float16", 0) == (4 if precision == "fp16" else 0)


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_full_integer_with_float_io(convert: Callable[..., Artifact]) -> None:
    art = convert("int8")
    io = art.info["io"]
    assert io["inputs"][0]["dtype"] == "float32" and io["outputs"][0]["dtype"] == "float32"
    check = art.info["check"]
    assert check["sqnr_db"] >= 25.0 and check["top1_agreement"] >= 90.0
    cal = art.info["calibration"]
    notes = cal["notes"]
    assert cal["calibration_samples"] + cal["holdout_samples"] == 64 and notes["fused_conv_relu6"] == 1
    # every activation observer took the shared calibration plan's range (paired by value)
    shared = notes["shared_ranges"]
    assert shared["from_plan"] == shared["observers"] > 5 and shared["observed_by_pt2e"] == [], shared
    assert shared["max_match_error"] < 1e-3 and cal["method"] in cal["method_scores"]
    # the plan's bias correction reached every quantized conv / linear (3 convs + the classifier)
    assert notes["bias_correction"]["applied"] and notes["bias_correction"]["layers"] == 4, notes["bias_correction"]
    # full integer: the only float32 tensors left are the float input and output themselves
    assert art.info["tensor_types"]["float32"] == 2 and art.info["tensor_types"]["int8"] > 10


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_io_option_records_quant_params(convert: Callable[..., Artifact]) -> None:
    float_io, int_io = convert("int8"), convert("int8", int8_io=True)
    q_in, q_out = int_io.runner_config["input_quant"], int_io.runner_config["output_quant"]
    assert q_in["dtype"] == "int8" and q_out["dtype"] == "int8" and q_in["scale"] > 0
    assert int_io.info["io"]["inputs"][0]["dtype"] == "int8"
    x = digits(8, offset=200)
    # the same integer graph: quantizing in the runner equals the model's own QUANTIZE op
    np.testing.assert_allclose(run_artifact(int_io, x), run_artifact(float_io, x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_layers_option_keeps_a_layer_float(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, NAME, tiny_cnn, digits(16), digits(8, offset=16), {"float_layers": ["0"]})
    art = get_backend(NAME).convert(ctx, "int8")
    assert art.info["calibration"]["notes"]["kept_float"] == ["0"]  # nn.Sequential index of the first conv
    assert art.info["tensor_types"]["float32"] > 2  # a float conv inside the integer graph
    # a float layer reads a float tensor: the conv feeding it (through ReLU and MaxPool) stays float too
    ctx.workdir = tmp_path / "depthwise"
    ctx.build.options["float_layers"] = ["4"]
    notes = get_backend(NAME).convert(ctx, "int8").info["calibration"]["notes"]
    assert notes["kept_float"] == ["0", "4"] and notes["float_producers"] == ["0"], notes["kept_float"]
    ctx.workdir = tmp_path / "again"
    ctx.build.options["float_layers"] = ["no_such_layer"]
    with pytest.raises(ConversionError, match="no_such_layer"):
        get_backend(NAME).convert(ctx, "int8")


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.parametrize("fallback", [True, False])
def test_fallback_keeps_the_planted_layer_float_to_meet_the_budget(tmp_path: Path, fallback: bool) -> None:
    ctx = planted_context(tmp_path, NAME, fallback)
    art = get_backend(NAME).convert(ctx, "int8")
    cal = art.info["calibration"]
    if not fallback:  # the planted layer ruins the holdout: the report says so (and the gate fails it);
        # the written model reproduces what the search scored, so the conversion's check passes
        assert cal["budget_met"] is False and "fallback is off" in cal["budget_reason"], cal
        check = art.info["check"]["metric"]
        assert abs(check["value"] - cal["holdout"]["top1_agreement"]) <= check["tolerance"], check
        return
    assert cal["budget_met"] is True and cal["holdout"]["drop_pp"] <= 10.0, cal
    # ranked by the gated ONNX model: the second conv (reading the x300 channel) saves the most
    first = cal["fallback_layers"][0]
    assert first["name"] == "2" and first["saved_db"] > 10.0 and len(cal["fallback_layers"]) == 1, cal
    assert first["op"].startswith("onnx ") and first["sqnr_db"] is None  # paired with its ONNX node
    # its input is the first conv's output, so that conv stays float with it; the classifier is int8
    assert cal["notes"]["kept_float"] == ["0", "2"] and cal["notes"]["float_producers"] == ["0"]
    assert cal["method_scores"][cal["method"]]["drop_pp"] > 10.0 and cal["fallback_tried"] == [[1, cal["holdout"]["drop_pp"]]]


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_channels_last_io_is_recorded_and_transposed(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, NAME, tiny_cnn, digits(8), digits(8, offset=8), {"channels_last_io": True})
    art = get_backend(NAME).convert(ctx, "fp32")
    assert art.runner_config["model_layout"] == "NHWC" and art.runner_config["data_layout"] == "NCHW"
    assert art.info["io"]["inputs"][0]["shape"] == [1, 28, 28, 1]
    assert art.info["check"]["rel_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_check_fails_when_a_weight_is_corrupted(convert: Callable[..., Artifact], tmp_path: Path) -> None:
    from ai_edge_litert.tools import flatbuffer_utils

    from pipeline.backends.checks import check_outputs

    art = convert("fp32")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray((art.workdir / "model.tflite").read_bytes()))
    biggest = max((b for b in model.buffers if b.data is not None), key=lambda b: len(b.data))
    weights = np.frombuffer(bytes(bytearray(biggest.data)), np.float32).copy()
    weights[: len(weights) // 2] *= -3.0  # flip and scale half of the largest weight tensor
    biggest.data = np.frombuffer(weights.tobytes(), np.uint8)
    (tmp_path / "model.tflite").write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    x = digits(16, offset=64)
    broken = Artifact(art.backend, art.precision, tmp_path, art.files, art.runner, art.runner_config)
    with pytest.raises(ConversionError, match=r"tflite fp32: max abs diff"):
        check_outputs(NAME, "fp32", run_artifact(art, x), run_artifact(broken, x))


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    ok, _ = get_backend(NAME).available()
    ctx = BuildContext(spec=None, target=None, build=None, workdir=tmp_path, onnx_fp32=tmp_path,  # type: ignore[arg-type]
                       input_names=["i"], output_names=["o"], calibration=None, check=None,  # type: ignore[arg-type]
                       reference={"o": np.zeros(1)}, cache_dir=tmp_path, torch_model=lambda: None)
    with pytest.raises(ConversionError, match="int4"):
        get_backend(NAME).convert(ctx, "int4")
    assert ok in (True, False)


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_mnist_int8_within_1pp_of_fp32(tmp_path: Path, mnist_spec: Any) -> None:
    acc = build_and_evaluate(NAME, mnist_spec, tmp_path, ["fp32", "int8"])
    assert acc["fp32"] - acc["int8"] <= 1.0, acc


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.skipif(not FULL, reason="minutes on 2 cores: set EDGESHIP_FULL_BACKEND_TESTS=1")
def test_efficientnet_lite0_all_precisions(tmp_path: Path) -> None:
    from pipeline.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "efficientnet_lite0.yaml")
    acc = build_and_evaluate(NAME, spec, tmp_path, ["fp32", "fp16", "int8"])  # ImageNet top-1, 400 images
    assert acc["fp32"] >= 85.0 and acc["fp32"] - acc["fp16"] <= 0.5 and acc["fp32"] - acc["int8"] <= 1.0, acc


@pytest.mark.backend(NAME)
def test_fallback_ranking_pairs_every_module_with_its_onnx_layer(tmp_path: Path) -> None:
    from calibration.graph import ensure_node_names, load_model, weighted_layers
    from calibration.transfer import onnx_activations

    from pipeline.backends.calibrate import calibration_plan
    from pipeline.backends.tflite.sensitivity import pair_modules, rank_modules

    ctx = make_context(tmp_path, NAME, tiny_cnn, digits(40), digits(8, offset=40))
    x = ctx.calibration.x["input"]
    values = onnx_activations(ctx.onnx_fp32, x[:2])
    model = load_model(ctx.onnx_fp32)
    ensure_node_names(model)
    # Conv+BN folded in ONNX, Linear as Gemm: paired by weight shape and input values, not names
    pairs = pair_modules(tiny_cnn(), x[:2], model, values)
    assert sorted(pairs) == ["0", "12", "4", "7"] and sorted(pairs.values()) == sorted(
        layer.node for layer in weighted_layers(model))
    plan = calibration_plan(ctx, "minmax", activation_mode="asymmetric")
    gated = rank_modules(tiny_cnn(), x[:32], x[32:], True, ctx.onnx_fp32, plan, values)
    assert sorted(s.name for s in gated) == ["0", "12", "4", "7"] and all(s.op.startswith("onnx ") for s in gated)
    assert [s.saved_db for s in gated] == sorted((s.saved_db for s in gated), reverse=True)
    # no plan (ort-default): every module ranked by the SQNR of quantizing its weights alone
    alone = rank_modules(tiny_cnn(), x[:32], x[32:], True)
    assert {s.op for s in alone} == {"weights only"} and len(alone) == 4
    assert [s.sqnr_db for s in alone] == sorted(s.sqnr_db for s in alone) and alone[0].sqnr_db < 60


def padded_cnn() -> Any:
    """TF-style "same" padding as explicit pads: an even one (foldable) and a stride-2 uneven one."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)),
                         nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


@pytest.mark.backend(NAME)
def test_even_zero_pads_fold_into_the_conv_exactly() -> None:
    import torch

    from pipeline.backends.tflite.quantizer import fold_zero_pads

    x = torch.from_numpy(digits(4))
    graph = torch.export.export(padded_cnn(), (x,)).module()
    before = graph(x)
    assert fold_zero_pads(graph) == 1  # the uneven stride-2 pad is not a conv padding
    pads = [n for n in graph.graph.nodes if "pad" in str(n.target)]
    assert len(pads) == 1 and list(pads[0].args[1]) == [0, 1, 0, 1]
    torch.testing.assert_close(graph(x), before, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_keeps_no_pad_op_a_conv_can_absorb(tmp_path: Path) -> None:
    import collections

    from ai_edge_litert.interpreter import Interpreter

    ctx = make_context(tmp_path, NAME, padded_cnn, digits(40), digits(8, offset=40))
    art = get_backend(NAME).convert(ctx, "int8")
    assert art.info["calibration"]["notes"]["pads_folded_into_conv"] == 1
    ops = collections.Counter(d["op_name"] for d in Interpreter(
        model_path=str(art.workdir / "model.tflite"))._get_ops_details())
    # without the fold the even pad stays a PAD op between quantize pairs, with its own TRANSPOSEs;
    # the uneven stride-2 one is TensorFlow's SAME, folded on the flatbuffer after conversion
    # (padfold; a one-input-channel conv lowers to DEPTHWISE_CONV_2D)
    assert art.info["pads_folded"] == {"into_conv": 1, "to_nhwc": 0}
    assert ops["PAD"] == 0 and ops["TRANSPOSE"] == 0 and ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"] == 2, ops
    assert art.info["check"]["top1_agreement"] >= 87.5
