"""AdaRound (calibration.adaround) on small models with a known answer, and the INT8 search and
the QDQ writer carrying its weights (``CalibrationConfig.adaround``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import CalibrationConfig, CalibrationSet, quantize_onnx
from calibration.adaround import AdaRoundOptions, adaround, as_rows, conv_rows
from calibration.config import resolve_methods
from calibration.errors import CalibrationConfigError
from calibration.graph import initializer_array, load_model, weighted_layers
from calibration.observers import weight_qparams
from calibration.plan import corrected_model, make_plan
from calibration.stats import collect_statistics

sys.path.insert(0, str(Path(__file__).parent))
from calib_models import build_cnn  # noqa: E402

FAST = AdaRoundOptions(iterations=300, rows=2048)


def conv_model(group: int, stride: int, dilation: int) -> "onnx.ModelProto":  # noqa: F821
    """x[N,4,9,9] -> Conv(4->8, 3x3, group, stride, dilation, asymmetric pads), no bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).normal(0, 0.3, (8, 4 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, strides=[stride, stride],
                            dilations=[dilation, dilation], pads=[1, 0, 2, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("group,stride,dilation", [(1, 1, 1), (2, 2, 1), (4, 1, 2)])
def test_conv_rows_are_the_convolution_inputs(group: int, stride: int, dilation: int) -> None:
    """rows x weights over every output position has the conv's per-channel sums and energies."""
    import onnxruntime as ort
    from onnx import helper

    model = conv_model(group, stride, dilation)
    x = np.random.default_rng(0).normal(size=(3, 4, 9, 9)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = initializer_array(model, "w")
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    attrs = {"group": group, "strides": attrs["strides"], "dilations": attrs["dilations"], "pads": attrs["pads"],
             "kernel": (3, 3)}
    layer = weighted_layers(model)[0]
    rows = conv_rows(x, attrs, y.shape[2] * y.shape[3], np.random.default_rng(0))  # every position, shuffled
    got = np.einsum("pgk,gmk->pgm", rows, as_rows(w, layer, group)).reshape(len(rows), -1)
    want = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    assert got.shape == want.shape
    np.testing.assert_allclose(got.sum(0), want.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose((got ** 2).sum(0), (want ** 2).sum(0), rtol=1e-4)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, calib_samples: np.ndarray):
    """The tiny CNN, its min-max plan and AdaRound's result on the calibration samples."""
    path = build_cnn(tmp_path_factory.mktemp("ada") / "cnn.onnx")
    model = load_model(path)
    calib = CalibrationSet.from_arrays(calib_samples)
    stats = collect_statistics(path, calib)
    plan = make_plan(model, stats, weighted_layers(model), "minmax", symmetric=False, correct_bias=False)
    return model, plan, calib, adaround(model, plan.layers, plan.weights, calib, FAST, model_sha=stats.model_sha256)


def test_learned_rounding_beats_nearest_on_its_data(learned) -> None:
    _, _, _, result = learned
    by_node = {r.node: r for r in result.layers}
    assert set(by_node) == {"conv1", "conv2", "fc"}
    # a Gemm on 64 samples for 8 inputs is determined; each learned layer is no worse than nearest
    for r in result.layers:
        assert r.kept or r.adaround_mse <= r.nearest_mse
    # the random 8->8 conv on 2048 rows: strictly better, by flipping some roundings
    assert not by_node["conv2"].kept
    assert by_node["conv2"].adaround_mse < 0.9 * by_node["conv2"].nearest_mse
    assert by_node["conv2"].flipped > 0


def test_learned_weights_stay_on_the_grid_with_every_scale(learned) -> None:
    """s * q exactly, |q| <= 127, each channel's absmax (every backend's scale) unchanged."""
    model, plan, _, result = learned
    assert "w2" in result.rounded
    for name, w_new in result.rounded.items():
        w = initializer_array(model, name)
        q = plan.weights[name]
        axis = 0 if w.ndim == 4 else q.axis
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        s = np.asarray(q.scale, np.float32).reshape(shape)
        ints = np.round(w_new / s)
        assert np.array_equal(w_new, (s * ints.astype(np.float32)).astype(np.float32))
        assert np.abs(ints).max() <= 127
        assert np.abs(ints - np.round(w / s)).max() <= 1  # only up or down, never further
        np.testing.assert_allclose(weight_qparams(w_new, axis).scale, weight_qparams(w, axis).scale, rtol=1e-6)


def test_only_the_weights_change_in_the_fp32_graph(learned) -> None:
    from onnx import numpy_helper

    model, plan, _, result = learned
    plan.rounded = result.rounded
    new = corrected_model(model, plan)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    for a, b in zip(model.graph.initializer, new.graph.initializer):
        same = np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
        assert same == (a.name not in result.rounded), a.name
    kept = corrected_model(model, plan, float_nodes=["conv2"])  # a float layer keeps its own weights
    assert np.array_equal(initializer_array(kept, "w2"), initializer_array(model, "w2"))


def test_a_seeded_run_is_deterministic_and_cached(learned, tmp_path: Path) -> None:
    model, plan, calib, result = learned
    again = adaround(model, plan.layers, plan.weights, calib, FAST, tmp_path, model_sha="m")
    cached = adaround(model, plan.layers, plan.weights, calib, FAST, tmp_path, model_sha="m")
    assert not again.cache_hit and cached.cache_hit
    for name, w in result.rounded.items():
        assert np.array_equal(again.rounded[name], w) and np.array_equal(cached.rounded[name], w)


def test_qdq_model_holds_the_learned_integers(tmp_path: Path, calib_samples: np.ndarray) -> None:
    """ONNX Runtime's QDQ writer, given s*q and the plan's scales, stores exactly q; build_plan
    gives the same learned weights from the cache."""
    import onnx
    from onnx import numpy_helper

    from calibration import build_plan

    path = build_cnn(tmp_path / "cnn.onnx")
    calib = CalibrationSet.from_arrays(calib_samples)
    cfg = CalibrationConfig(method="minmax", adaround="on", fallback=False)
    report = quantize_onnx(path, tmp_path / "int8.onnx", calib, cfg, tmp_path / "cache")
    assert report.method == "minmax+ada"
    assert "conv2" not in report.notes["adaround"]["kept_nearest"]
    plan = build_plan(path, calib, "minmax+ada", cfg, tmp_path / "cache")
    assert "w2" in plan.rounded and plan.rounded.keys() == set(report.notes["adarounded"])
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer}
    for name, w in plan.rounded.items():
        s = np.asarray(plan.weights[name].scale, np.float32).reshape([-1] + [1] * (w.ndim - 1))
        if name == "w3":  # the Gemm's output axis is 0 (transB)
            s = s.reshape(-1, 1)
        q = written[name + "_quantized"][tuple(slice(0, d) for d in w.shape)]  # w1 is padded to 4 channels
        assert np.array_equal(q.astype(np.int64), np.round(w / s).astype(np.int64))


def test_config_and_method_names() -> None:
    assert resolve_methods("minmax", adaround="on") == ("minmax+ada",)
    assert resolve_methods("minmax", "auto", "auto") == ("minmax", "minmax+ada", "minmax+cle", "minmax+ada+cle")
    with pytest.raises(CalibrationConfigError, match="adaround"):
        CalibrationConfig(adaround="yes")


def test_ncnn_and_pt2e_weight_quantizers_give_back_the_learned_integers(learned) -> None:
    """ncnn's int8 writer (absmax / 127, round half away) and litert-torch's PT2E per-channel
    weight observer, run on the learned float weights, store the same q as the plan's scale."""
    import torch
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    from pipeline.backends.ncnn.int8 import weight_scales
    from pipeline.backends.ncnn.paramfile import Layer

    model, plan, _, result = learned
    w = result.rounded["w2"]
    s = np.asarray(plan.weights["w2"].scale, np.float32)
    want = np.round(w / s[:, None, None, None]).astype(np.int64)
    q_ncnn, _ = weight_scales(Layer("Convolution", "conv2", ["r1"], ["c2"], {0: str(w.shape[0])}), w, True)
    assert np.array_equal(q_ncnn.reshape(w.shape).astype(np.int64), want)
    spec = get_symmetric_quantization_config(is_per_channel=True).weight
    assert spec.qscheme == torch.per_channel_symmetric  # the case AdaRound keeps the scale for
    observer = spec.observer_or_fake_quant_ctr(dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max,
                                               qscheme=spec.qscheme, ch_axis=spec.ch_axis)
    observer(torch.from_numpy(w))
    scale, zero = observer.calculate_qparams()
    q_pt2e = torch.quantize_per_channel(torch.from_numpy(w), scale, zero, 0, torch.qint8).int_repr().numpy()
    assert np.array_equal(q_pt2e.astype(np.int64), want)
