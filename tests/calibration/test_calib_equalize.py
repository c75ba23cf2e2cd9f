"""Cross-layer equalisation (calibration.equalize) on small models with a known answer, and the
INT8 search trying it (calibration.quantize_onnx, ``equalize``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import CalibrationConfig, CalibrationSet, quantize_onnx
from calibration.equalize import equalize, find_pairs, range_ratio
from calibration.errors import CalibrationConfigError

sys.path.insert(0, str(Path(__file__).parent))
from calib_models import build_cnn  # noqa: E402

# per-channel weight scales far apart: the imbalance CLE exists to remove
IMBALANCE = np.array([100.0, 1.0, 0.01, 10.0], np.float32)


def chain_model(act: str = "Relu") -> "onnx.ModelProto":  # noqa: F821
    """x[N,3,6,6] -> Conv(3->4) -> act -> depthwise Conv(4, group 4) -> act -> Conv(4->5).

    ``act`` "Relu" or "Clip" (Clip(0, 6) with constant bounds, as the exporter writes ReLU6).
    Output channel i of the first conv is scaled by IMBALANCE[i] (bias too) and the depthwise
    conv's channel i by 1 / IMBALANCE[i] ** 0.5, so both convs' channel ranges span decades.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32) * IMBALANCE[:, None, None, None]
    b1 = rng.normal(0, 0.1, 4).astype(np.float32) * IMBALANCE
    wd = rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32) / np.sqrt(IMBALANCE)[:, None, None, None]
    bd = rng.normal(0, 0.1, 4).astype(np.float32)
    w3 = rng.normal(0, 0.3, (5, 4, 1, 1)).astype(np.float32)
    b3 = rng.normal(0, 0.1, 5).astype(np.float32)
    arrays = {"w1": w1, "b1": b1, "wd": wd, "bd": bd, "w3": w3, "b3": b3,
              "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    bounds = ["lo", "hi"] if act == "Clip" else []
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(act, ["c1", *bounds], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=4),
        helper.make_node(act, ["c2", *bounds], ["a2"], name="act2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="project"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: "onnx.ModelProto", x: np.ndarray) -> np.ndarray:  # noqa: F821
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def weight(model: "onnx.ModelProto", name: str) -> np.ndarray:  # noqa: F821
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    # scaled down so that no pre-activation reaches 6: the Clip model then computes what Relu does
    return np.random.default_rng(1).normal(0, 0.05, (8, 3, 6, 6)).astype(np.float32)


def test_relu_chain_keeps_outputs_and_narrows_ranges(x: np.ndarray) -> None:
    model = chain_model("Relu")
    out, report = equalize(model)
    assert [(p.first, p.second, p.depthwise_second) for p in report.pairs] == [("conv1", "dw", True),
                                                                             ("dw", "project", False)]
    ref = run(model, x)
    np.testing.assert_allclose(run(out, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    for conv, w in (("conv1", "w1"), ("dw", "wd")):
        before, after = range_ratio(weight(model, w)), range_ratio(weight(out, w))
        assert before > 50.0 and after < before / 10.0, (conv, before, after)
        assert report.range_ratio[conv] == pytest.approx((before, after))
    assert report.iterations > 1 and report.max_scale_change < 1e-4  # the chain converged
    assert range_ratio(weight(chain_model("Relu"), "w1")) == range_ratio(weight(model, "w1"))  # input untouched


def test_one_pair_balances_exactly() -> None:
    """After one pass over a lone pair, r1_i == r2_i for every channel (s_i = sqrt(r1 r2) / r2)."""
    from calibration.equalize import out_channel_ranges, pair_scales

    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 1, (4, 3, 3, 3)) * IMBALANCE[:, None, None, None]
    w2 = rng.normal(0, 1, (6, 4, 1, 1))
    s = pair_scales(w1, w2, depthwise_second=False)
    r1 = out_channel_ranges(w1 / s[:, None, None, None])
    r2 = np.abs(w2 * s[None, :, None, None]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-12)


def test_relu6_pairs_skipped_by_default(x: np.ndarray) -> None:
    model = chain_model("Clip")
    pairs, skipped = find_pairs(model)
    assert pairs == [] and skipped == 2
    out, report = equalize(model)
    assert report.pairs == [] and report.skipped_relu6 == 2
    np.testing.assert_array_equal(run(out, x), run(model, x))  # untouched


def test_relu6_becomes_relu_when_asked(x: np.ndarray) -> None:
    """relu6="relu": each Clip of an equalised pair is a Relu afterwards; on inputs that never
    reach 6 the result equals the original, and a pre-activation above 6 shows the change."""
    model = chain_model("Clip")
    out, report = equalize(model, relu6="relu")
    assert len(report.pairs) == 2 and sorted(report.relu6_replaced) == ["act1", "act2"]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv", "Relu", "Conv"]
    ref = run(model, x)
    np.testing.assert_allclose(run(out, x), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    np.testing.assert_allclose(run(out, x), run(equalize(chain_model("Relu"))[0], x), rtol=1e-5, atol=1e-6)
    big = x * 400.0  # channel 0 (x100) now exceeds 6: ReLU6 clips, Relu does not
    assert np.abs(run(out, big) - run(model, big)).max() > 1.0
    with pytest.raises(CalibrationConfigError, match="relu6"):
        equalize(model, relu6="clip")  # type: ignore[arg-type]


def test_shared_or_multi_consumer_tensors_are_not_paired() -> None:
    """A conv output read twice (a residual branch) cannot be rescaled on one side only."""
    from onnx import helper

    model = chain_model("Relu")
    model.graph.node.append(helper.make_node("Add", ["a1", "a1"], ["twice"], name="residual"))
    model.graph.output.append(helper.make_tensor_value_info("twice", 1, None))
    pairs, _ = find_pairs(model)
    assert [(p.first, p.second) for p in pairs] == [("dw", "project")]


def test_search_tries_equalisation_and_undoes_a_planted_imbalance(tmp_path: Path, calib_samples: np.ndarray) -> None:
    """build_cnn's outlier channel is exactly a CLE-removable imbalance (conv1 channel 0 x3000,
    conv2's input channel 0 / 3000): with equalize="auto" both graphs are scored, the
    equalised one wins by holdout SQNR, and its statistics are its own (cache key = its sha)."""
    model = build_cnn(tmp_path / "planted.onnx", seed=3, outlier_channel=3000.0)
    calib = CalibrationSet.from_arrays(calib_samples)
    cfg = CalibrationConfig(method="minmax", equalize="auto", bias_correction=False)
    rep = quantize_onnx(model, tmp_path / "q.onnx", calib, cfg, tmp_path / "cache")
    scores = rep.method_scores
    assert set(scores) == {"minmax", "minmax+cle"} and rep.method == "minmax+cle"
    assert scores["minmax+cle"]["sqnr_db"] > scores["minmax"]["sqnr_db"] + 10.0
    eq = rep.notes["equalization"]
    assert eq["shipped"] is True and eq["pairs"] == 1 and eq["median_range_ratio_after"] < eq["median_range_ratio_before"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one statistics entry per graph
    off = quantize_onnx(model, tmp_path / "p.onnx", calib, CalibrationConfig(method="minmax", bias_correction=False),
                        tmp_path / "cache")
    assert set(off.method_scores) == {"minmax"} and "equalization" not in off.notes
    assert off.holdout["sqnr_db"] == scores["minmax"]["sqnr_db"]  # the plain candidate is today's
    with pytest.raises(CalibrationConfigError, match="equalize"):
        CalibrationConfig(equalize="yes")
