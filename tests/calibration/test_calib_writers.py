"""Each writer's output read back and checked against its format."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from calibration.data import CalibrationSet
from calibration.graph import initializer_array, load_model, weighted_layers
from calibration.plan import QuantPlan, make_plan
from calibration.stats import collect_statistics
from calibration.writers.ncnn import read_ncnn_table, write_ncnn_table
from calibration.writers.qdq import read_qdq_params, write_qdq
from calibration.writers.tensorrt import (
    check_tensorrt_rules,
    float_to_hex,
    read_calibration_cache,
    write_calibration_cache,
    write_tensorrt_qdq,
)
from calibration.writers.tflite import write_tflite_calibration


def _plan(model_path: Path, samples: np.ndarray, cache: Path, symmetric: bool, method: str = "mse") -> QuantPlan:
    model = load_model(model_path)
    stats = collect_statistics(model_path, CalibrationSet.from_arrays(samples), cache)
    return make_plan(model, stats, weighted_layers(model), method, symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_qdq_scales_are_ours(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path, symmetric: bool) -> None:
    plan = _plan(tiny_cnn, calib_samples, tmp_path, symmetric)
    out = tmp_path / "q.onnx"
    res = write_qdq(tiny_cnn, out, plan.ranges, plan.acts, plan.weights, symmetric, per_channel=True)
    assert res.mismatches == []
    acts, weights = read_qdq_params(out)
    assert {"x", "r1"} <= set(acts)
    for name, (scale, zp) in acts.items():
        q = plan.acts[name]
        assert scale == pytest.approx(float(q.scale), rel=1e-6), name
        assert zp == int(q.zero_point)
        if symmetric:
            assert zp == 0
    assert acts["r1"][1] == 0  # post-ReLU: zero point 0 in both modes
    for w in ("w1", "w2", "w3"):
        np.testing.assert_allclose(weights[w][0], plan.weights[w].scale, rtol=1e-6)
        assert not weights[w][1].any()
    # per output channel: conv weights (8, ...) -> 8 scales; Gemm transB (4, 8) -> 4 scales
    assert weights["w1"][0].shape == (8,) and weights["w3"][0].shape == (4,)
    w1 = initializer_array(load_model(tiny_cnn), "w1")
    np.testing.assert_allclose(weights["w1"][0], np.abs(w1).reshape(8, -1).max(1) / 127, rtol=1e-6)


def test_qdq_runs_close_to_fp32(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    from calibration.metrics import sqnr_db
    from calibration.runtime import make_session, predict

    plan = _plan(tiny_cnn, calib_samples, tmp_path, False)
    out = write_qdq(tiny_cnn, tmp_path / "q.onnx", plan.ranges, plan.acts, plan.weights, False, True).path
    ref = predict(make_session(tiny_cnn), calib_samples)
    assert sqnr_db(ref, predict(make_session(out), calib_samples)) > 25.0


def test_tensorrt_cache_format(tmp_path: Path) -> None:
    assert float_to_hex(1.0) == "3f800000" and float_to_hex(-2.0) == "c0000000"
    ranges = {"input": (-2.54, 1.0), "conv1_out": (0.0, 12.7)}
    scales = write_calibration_cache(tmp_path / "calib.cache", ranges, trt_version="8601")
    lines = (tmp_path / "calib.cache").read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    name, hexval = lines[1].split(": ")
    assert name == "input" and len(hexval) == 8
    # the hex is the big-endian float32 bit pattern of amax / 127
    assert struct.unpack(">f", bytes.fromhex(hexval))[0] == pytest.approx(2.54 / 127, rel=1e-6)
    header, back = read_calibration_cache(tmp_path / "calib.cache")
    assert header.startswith("TRT-") and back == pytest.approx(scales)
    assert back["conv1_out"] == pytest.approx(0.1, rel=1e-6)


def test_tensorrt_qdq_obeys_explicit_quantization_rules(
    tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    plan = _plan(tiny_cnn, calib_samples, tmp_path, symmetric=True)
    out = tmp_path / "trt.onnx"
    write_tensorrt_qdq(tiny_cnn, out, plan)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name == "conv1")
    assert conv.input[2] == "b1"  # float bias
    # an asymmetric plan is refused, and a uint8 model fails the rule check
    with pytest.raises(Exception, match="symmetric"):
        write_tensorrt_qdq(tiny_cnn, tmp_path / "bad.onnx", _plan(tiny_cnn, calib_samples, tmp_path, False))
    asym = _plan(tiny_cnn, calib_samples, tmp_path, False)
    write_qdq(tiny_cnn, tmp_path / "u8.onnx", asym.ranges, asym.acts, asym.weights, False, True)
    with pytest.raises(Exception, match="zero point 0|int32 bias"):
        check_tensorrt_rules(tmp_path / "u8.onnx")


def test_ncnn_table_format(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    plan = _plan(tiny_cnn, calib_samples, tmp_path, symmetric=True)
    path = tmp_path / "model.table"
    write_ncnn_table(path, plan, layer_names={"conv1": "convolution_0", "conv2": "convolution_1", "fc": "innerproduct_0"})
    text = path.read_text().splitlines()
    # weight lines first ("<layer>_param_0 s..."), then activation lines ("<layer> s")
    assert text[0].startswith("convolution_0_param_0 ") and len(text[0].split()) == 1 + 8
    assert text[3].split()[0] == "convolution_0" and len(text[3].split()) == 2
    weights, acts = read_ncnn_table(path)
    w1 = initializer_array(load_model(tiny_cnn), "w1")
    np.testing.assert_allclose(weights["convolution_0"], 127 / np.abs(w1).reshape(8, -1).max(1), rtol=1e-5)
    lo, hi = plan.ranges["x"]
    assert acts["convolution_0"] == pytest.approx(127 / max(-lo, hi), rel=1e-5)
    assert weights["innerproduct_0"].shape == (4,)
    # ncnn's docs: a commented weight line keeps that layer in float
    path.write_text(path.read_text().replace("convolution_1_param_0", "#convolution_1_param_0"))
    assert "convolution_1" not in read_ncnn_table(path)[0]


def test_tflite_samples_and_manifest(tmp_path: Path) -> None:
    calib = CalibrationSet.from_arrays(np.random.default_rng(0).normal(size=(6, 3, 4, 4)))
    npy, manifest = write_tflite_calibration(tmp_path, calib)
    back = np.load(npy)
    assert back.dtype == np.float32 and np.array_equal(back, calib.samples)
    m = json.loads(manifest.read_text())
    assert m["set_sha256"] == calib.content_hash == CalibrationSet.from_arrays(back).content_hash


def test_layer_before_a_float_fallback_gets_float_weights_and_the_same_outputs(
        tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    """conv2 falls back to float, so conv1 keeps int8 inputs but a float output: ONNX Runtime
    cannot fuse it into QLinearConv, and a weight left behind a DequantizeLinear would be
    dequantized on every run and miss the prepacked float kernel. The fold makes it a float
    initializer holding exactly the dequantized values."""
    from calibration.plan import float_tensors_for
    from calibration.runtime import make_session, predict
    from calibration.writers.qdq import fold_unfused_weights

    import onnx

    plan = _plan(tiny_cnn, calib_samples, tmp_path, symmetric=False)
    floats = float_tensors_for(load_model(tiny_cnn), ["conv2"])
    assert floats == {"c1", "r1"}  # the ReLU between them too
    kw = dict(nodes_to_exclude=["conv2"], float_tensors=floats)
    plain = write_qdq(tiny_cnn, tmp_path / "plain.onnx", plan.ranges, plan.acts, plan.weights, False, True, **kw).path
    folded = write_qdq(tiny_cnn, tmp_path / "folded.onnx", plan.ranges, plan.acts, plan.weights, False, True,
                       ort_fusions=True, **kw).path

    def weight_inputs(path: Path, node: str) -> list[str]:
        m = onnx.load(str(path))
        inits = {i.name for i in m.graph.initializer}
        producer = {o: n.op_type for n in m.graph.node for o in n.output}
        conv = next(n for n in m.graph.node if n.name == node)
        return ["float" if i in inits else producer[i] for i in conv.input[1:]]

    assert weight_inputs(plain, "conv1") == ["DequantizeLinear", "DequantizeLinear"]
    assert weight_inputs(folded, "conv1") == ["float", "float"]
    # fc's output is quantized (ORT quantizes the graph output too): it still fuses, left alone
    assert weight_inputs(folded, "fc") == ["DequantizeLinear", "DequantizeLinear"]
    producer = {o: n.op_type for n in onnx.load(str(folded)).graph.node for o in n.output}
    assert producer[next(n for n in onnx.load(str(folded)).graph.node if n.name == "conv1").input[0]] == "DequantizeLinear"
    a = predict(make_session(plain), calib_samples)
    b = predict(make_session(folded), calib_samples)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert fold_unfused_weights(folded) == 0  # nothing left to fold
    used = {i for n in onnx.load(str(folded)).graph.node for i in n.input}
    assert {i.name for i in onnx.load(str(folded)).graph.initializer} <= used


def test_a_three_channel_stem_is_padded_to_four_channels_with_the_same_outputs(
        tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    """ONNX Runtime's fused int8 conv kernel takes input channels in fours; conv1 reads 3. The
    padded model appends a zero-point channel to conv1's quantized input and a zero weight
    channel, so every output is the same sum, and the optimized session runs conv1 as a
    QLinearConv reading 4 channels."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from calibration.runtime import make_session, predict
    from calibration.writers.qdq import pad_conv_channels

    plan = _plan(tiny_cnn, calib_samples, tmp_path, symmetric=False)
    plain = write_qdq(tiny_cnn, tmp_path / "plain.onnx", plan.ranges, plan.acts, plan.weights, False, True).path
    padded = tmp_path / "padded.onnx"
    padded.write_bytes(plain.read_bytes())
    assert pad_conv_channels(padded, 4) == 1

    m = onnx.load(str(padded))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    conv1 = next(n for n in m.graph.node if n.name == "conv1")
    pad = producer[producer[conv1.input[0]].input[0]]
    assert pad.op_type == "Pad" and producer[pad.input[0]].op_type == "QuantizeLinear"
    w = inits[producer[conv1.input[1]].input[0]]
    assert w.shape == (8, 4, 3, 3) and not w[:, 3].any()
    conv2 = next(n for n in m.graph.node if n.name == "conv2")  # 8 channels: left alone
    assert producer[producer[conv2.input[0]].input[0]].op_type == "QuantizeLinear"
    np.testing.assert_array_equal(predict(make_session(padded), calib_samples),
                                  predict(make_session(plain), calib_samples))
    assert pad_conv_channels(padded, 4) == 0  # nothing narrow left

    # a weight zero point that is not 0: a zero channel would not be the integer 0, so no padding
    shifted = onnx.load(str(plain))
    zp = next(i for i in shifted.graph.initializer if i.name == producer[conv1.input[1]].input[2])
    zp.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(zp).shape, np.int8), zp.name))
    onnx.save(shifted, str(tmp_path / "shifted.onnx"))
    assert pad_conv_channels(tmp_path / "shifted.onnx", 4) == 0

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(padded), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimized.onnx"))
    fused = {i.name: list(i.dims) for i in opt.graph.initializer}
    stem = [n for n in opt.graph.node if n.op_type == "QLinearConv" and fused.get(n.input[3], [0, 0])[1] == 4]
    assert len(stem) == 1


def _mean_pooled(src: Path, out: Path, opset: int, keepdims: int = 1, conv_head: bool = False) -> Path:
    """tiny_cnn with its GlobalAveragePool written as PyTorch's exporter writes
    ``adaptive_avg_pool2d(x, 1)``: ReduceMean over H and W (axes an attribute before opset 18,
    an input since)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    gap = next(n for n in m.graph.node if n.op_type == "GlobalAveragePool")
    if opset >= 18:
        m.graph.initializer.append(numpy_helper.from_array(np.array([-1, -2], np.int64), "mean_axes"))
        mean = helper.make_node("ReduceMean", [gap.input[0], "mean_axes"], list(gap.output), name="mean", keepdims=keepdims)
    else:
        mean = helper.make_node("ReduceMean", list(gap.input), list(gap.output), name="mean", axes=[2, 3],
                                keepdims=keepdims)
    gap.CopyFrom(mean)
    if conv_head:  # the mean read by a 1x1 conv (quantized directly), then flattened
        fc = next(n for n in m.graph.node if n.op_type == "Gemm")
        w3 = next(i for i in m.graph.initializer if i.name == fc.input[1])
        w3.dims.extend([1, 1])
        flatten = next(n for n in m.graph.node if n.op_type == "Flatten")
        flatten.input[0], flatten.output[0] = "head", fc.output[0]
        fc.CopyFrom(helper.make_node("Conv", [gap.output[0], *fc.input[1:]], ["head"], name="head"))
        nodes = sorted(m.graph.node, key=lambda n: n.op_type == "Flatten")  # the flatten last
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    if not keepdims:  # Flatten of a [N, C] tensor is itself
        next(n for n in m.graph.node if n.op_type == "Flatten").attribute.append(helper.make_attribute("axis", 1))
    m.opset_import[0].version = opset
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("opset, conv_head", [(17, False), (18, False), (18, True)])
def test_a_quantized_spatial_mean_becomes_a_fused_int8_pool(
        tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path, opset: int, conv_head: bool) -> None:
    """ONNX Runtime has no int8 ReduceMean: DQ -> ReduceMean -> Q runs a float mean. Written as
    GlobalAveragePool (the same arithmetic) it fuses into QLinearGlobalAveragePool, and the
    outputs stay those of the float mean to within the pool output's rounding. The Q either
    reads the mean (a conv head) or the flattened mean (a Gemm head: the Q moves before the
    Flatten)."""
    import onnx
    import onnxruntime as ort

    from calibration.metrics import sqnr_db
    from calibration.runtime import make_session, predict
    from calibration.writers.qdq import pool_spatial_means

    src = _mean_pooled(tiny_cnn, tmp_path / "mean.onnx", opset, conv_head=conv_head)
    plan = _plan(src, calib_samples, tmp_path, symmetric=False)
    plain = write_qdq(src, tmp_path / "plain.onnx", plan.ranges, plan.acts, plan.weights, False, True).path
    pooled = write_qdq(src, tmp_path / "pooled.onnx", plan.ranges, plan.acts, plan.weights, False, True,
                       ort_fusions=True).path
    ops = [n.op_type for n in onnx.load(str(pooled)).graph.node]
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(plain)).graph.node]
    assert pool_spatial_means(pooled) == 0

    def fused_ops(path: Path) -> list[str]:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]

    assert "QLinearGlobalAveragePool" in fused_ops(pooled)
    assert "QLinearGlobalAveragePool" not in fused_ops(plain)
    fp32 = predict(make_session(src), calib_samples)
    a, b = predict(make_session(plain), calib_samples), predict(make_session(pooled), calib_samples)
    assert sqnr_db(a, b) > 30  # one rounding of the pool's output apart
    assert abs(sqnr_db(fp32, b) - sqnr_db(fp32, a)) < 0.5


def test_a_float_or_flattening_mean_is_left_alone(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    """A mean that drops its dimensions is not a GlobalAveragePool, and a mean kept float (no Q
    reads it) has no int8 kernel to fuse into: both stay ReduceMean."""
    import onnx

    from calibration.writers.qdq import pool_spatial_means

    flat = _mean_pooled(tiny_cnn, tmp_path / "flat.onnx", 18, keepdims=0)
    plan = _plan(flat, calib_samples, tmp_path, symmetric=False)
    out = write_qdq(flat, tmp_path / "flat_q.onnx", plan.ranges, plan.acts, plan.weights, False, True,
                    ort_fusions=True).path
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(out)).graph.node]

    src = _mean_pooled(tiny_cnn, tmp_path / "mean.onnx", 18)
    plan = _plan(src, calib_samples, tmp_path, symmetric=False)
    kept = write_qdq(src, tmp_path / "kept.onnx", plan.ranges, plan.acts, plan.weights, False, True,
                     float_tensors={"gap", "flat"}).path
    assert pool_spatial_means(kept) == 0
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(kept)).graph.node]
