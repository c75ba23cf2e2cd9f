"""quantize_onnx end to end on tiny models: method choice, cache, fallback, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import CalibrationConfig, CalibrationSet, quantize_onnx
from calibration.errors import CalibrationConfigError
from calibration.graph import load_model

sys.path.insert(0, str(Path(__file__).parent))
from calib_models import build_cnn  # noqa: E402


def test_auto_scores_every_method_on_holdout(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    calib = CalibrationSet.from_arrays(calib_samples)
    rep = quantize_onnx(tiny_cnn, tmp_path / "q.onnx", calib, CalibrationConfig(method="auto"), tmp_path / "cache")
    assert set(rep.method_scores) == {"minmax", "percentile", "entropy", "mse"}
    best = max(rep.method_scores.values(), key=lambda s: s["sqnr_db"])["sqnr_db"]
    assert rep.method_scores[rep.method]["sqnr_db"] == best
    assert rep.method in rep.reason and "SQNR" in rep.reason
    assert rep.holdout["n"] == round(0.2 * len(calib))  # scored on the held-out slice only
    assert rep.holdout["sqnr_db"] > 20 and (tmp_path / "q.onnx").is_file()
    assert rep.per_layer_sqnr and all("tensor" in r and "sqnr_db" in r for r in rep.per_layer_sqnr)
    assert not rep.stats_cache_hit
    assert rep.notes["scale_mismatches"] == []  # the written scales are exactly the computed ones
    json.dumps(rep.to_dict())  # JSON-able

    # choosing another method reuses the statistics: no calibration run
    rep2 = quantize_onnx(tiny_cnn, tmp_path / "q2.onnx", calib, CalibrationConfig(method="entropy"), tmp_path / "cache")
    assert rep2.stats_cache_hit and rep2.method == "entropy" and list(rep2.method_scores) == ["entropy"]


def test_tensorrt_target_is_symmetric(tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path) -> None:
    from calibration.writers.tensorrt import check_tensorrt_rules

    cfg = CalibrationConfig(method="minmax", target="tensorrt")
    rep = quantize_onnx(tiny_cnn, tmp_path / "t.onnx", CalibrationSet.from_arrays(calib_samples), cfg)
    assert rep.notes["activation_mode"] == "symmetric"
    check_tensorrt_rules(tmp_path / "t.onnx")
    with pytest.raises(CalibrationConfigError, match="symmetric"):
        CalibrationConfig(target="tensorrt", activation_mode="asymmetric")


def test_fallback_finds_planted_sensitive_layer(tmp_path: Path, calib_samples: np.ndarray) -> None:
    model = build_cnn(tmp_path / "planted.onnx", seed=3, outlier_channel=3000.0)
    calib = CalibrationSet.from_arrays(calib_samples)
    # bias correction off: it would re-centre the logits of this toy model and hide the damage
    # from top-1 (not from SQNR); the planted damage is the activation range, not weight rounding
    no_budget = quantize_onnx(model, tmp_path / "a.onnx", calib, CalibrationConfig(method="minmax", bias_correction=False))
    assert no_budget.holdout["drop_pp"] > 5  # the outlier channel really hurts

    cfg = CalibrationConfig(method="minmax", max_drop_pp=0.0, bias_correction=False)
    rep = quantize_onnx(model, tmp_path / "b.onnx", calib, cfg)
    assert rep.budget_met is True
    assert [f.name for f in rep.fallback_layers] == ["conv2"]  # just the planted layer
    fb = rep.fallback_layers[0]
    assert fb.saved_db > 10 and fb.op == "Conv" and np.isfinite(fb.sqnr_db)
    assert rep.holdout["drop_pp"] <= 0.0 and rep.holdout["sqnr_db"] > no_budget.holdout["sqnr_db"] + 10
    # the float layer really is float in the written model: no DequantizeLinear feeds conv2
    import onnx

    m = onnx.load(str(tmp_path / "b.onnx"))
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    assert producers.get(conv2.input[0]) != "DequantizeLinear" and conv2.input[1] == "w2"


def test_sqnr_floor_reaches_the_qdq_model(tmp_path: Path, calib_samples: np.ndarray) -> None:
    """The fidelity floor alone (no drop budget) keeps the planted layer float in the written model."""
    model = build_cnn(tmp_path / "planted.onnx", seed=3, outlier_channel=3000.0)
    calib = CalibrationSet.from_arrays(calib_samples)
    plain = quantize_onnx(model, tmp_path / "a.onnx", calib, CalibrationConfig(method="minmax", bias_correction=False))
    floor = plain.holdout["sqnr_db"] + 10.0
    rep = quantize_onnx(model, tmp_path / "f.onnx", calib,
                        CalibrationConfig(method="minmax", bias_correction=False, min_sqnr_db=floor))
    assert rep.budget_met is True and [f.name for f in rep.fallback_layers] == ["conv2"]
    assert rep.holdout["sqnr_db"] >= floor
    with pytest.raises(CalibrationConfigError, match="min_sqnr_db"):
        CalibrationConfig(min_sqnr_db=0.0)


def test_fallback_on_a_fixed_batch_model(tmp_path: Path, calib_samples: np.ndarray) -> None:
    """Exported edge models usually have a static batch of 1: sensitivity runs must respect it."""
    model = build_cnn(tmp_path / "b1.onnx", seed=3, outlier_channel=3000.0, batch=1)
    cfg = CalibrationConfig(method="minmax", max_drop_pp=0.0, bias_correction=False, batch_size=16)
    rep = quantize_onnx(model, tmp_path / "b1q.onnx", CalibrationSet.from_arrays(calib_samples), cfg)
    # static shapes, so ONNX Runtime's cost model applies: the 8->4 classifier has less
    # arithmetic than its crossings, so the cost order takes it first (float is faster), then the
    # planted conv2; with both float the 3-channel stem loses time in int8 and is closed too.
    # TensorRT's target keeps the fidelity order and closes nothing
    names = [f.name for f in rep.fallback_layers]
    assert rep.budget_met is True and names == ["fc", "conv2", "conv1"] and rep.islands_closed == ["conv1"]
    trt = quantize_onnx(model, tmp_path / "b1t.onnx", CalibrationSet.from_arrays(calib_samples),
                        CalibrationConfig(method="minmax", max_drop_pp=0.0, bias_correction=False, batch_size=16,
                                          target="tensorrt"))
    assert trt.islands_closed == [] and [f.name for f in trt.fallback_layers] == ["conv2"]


def test_fallback_reports_unmeetable_budget(tmp_path: Path, calib_samples: np.ndarray) -> None:
    model = build_cnn(tmp_path / "planted.onnx", seed=3, outlier_channel=3000.0)
    calib = CalibrationSet.from_arrays(calib_samples)
    cfg = CalibrationConfig(method="minmax", max_drop_pp=0.0, max_fallback_layers=0, bias_correction=False)
    rep = quantize_onnx(model, tmp_path / "c.onnx", calib, cfg)
    assert rep.budget_met is False and "budget" in rep.budget_reason
    cfg = CalibrationConfig(method="minmax", max_drop_pp=0.0, fallback=False, bias_correction=False)
    rep = quantize_onnx(model, tmp_path / "d.onnx", calib, cfg)
    assert rep.budget_met is False and "fallback is off" in rep.budget_reason


def test_import_is_light() -> None:
    import subprocess

    code = (
        "import sys, calibration; "
        "from calibration import CalibrationConfig, CalibrationSet; "
        "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stdout + res.stderr


def test_build_plan_reuses_statistics_and_feeds_other_writers(
    tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path
) -> None:
    from calibration import build_plan
    from calibration.writers.ncnn import read_ncnn_table, write_ncnn_table
    from calibration.writers.tensorrt import read_calibration_cache, write_calibration_cache

    calib = CalibrationSet.from_arrays(calib_samples)
    cfg = CalibrationConfig(method="auto", target="tensorrt")
    rep = quantize_onnx(tiny_cnn, tmp_path / "q.onnx", calib, cfg, tmp_path / "cache")
    plan = build_plan(tiny_cnn, calib, rep.method, cfg, tmp_path / "cache")
    assert plan.ranges == {k: tuple(v) for k, v in rep.notes["ranges"].items()}  # same ranges everywhere
    write_calibration_cache(tmp_path / "c.cache", plan.ranges)
    _, scales = read_calibration_cache(tmp_path / "c.cache")
    assert scales["x"] == pytest.approx(max(abs(v) for v in plan.ranges["x"]) / 127, rel=1e-6)
    write_ncnn_table(tmp_path / "t.table", plan)
    assert set(read_ncnn_table(tmp_path / "t.table")[1]) == {"conv1", "conv2", "fc"}


def test_per_layer_table_points_at_planted_layer(tmp_path: Path, calib_samples: np.ndarray) -> None:
    model = build_cnn(tmp_path / "planted.onnx", seed=3, outlier_channel=3000.0)
    cfg = CalibrationConfig(method="minmax", bias_correction=False)
    rep = quantize_onnx(model, tmp_path / "q.onnx", CalibrationSet.from_arrays(calib_samples), cfg)
    table = {r["tensor"]: r["sqnr_db"] for r in rep.per_layer_sqnr}
    # the damage enters at conv2 (its input r1 is fine on its own; its output r2 is not)
    assert table["x"] > 30 and table["r2"] < 10
    # the shipped model has its 3-channel stem padded for ONNX Runtime's fused kernel; the table
    # above is still the tensors of the model it was calibrated on
    assert "Pad" in {n.op_type for n in load_model(tmp_path / "q.onnx").graph.node}


def test_bias_correction_removes_weight_rounding_shift(tiny_cnn: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    # inputs with a large mean: weight rounding error times that mean is a systematic shift
    x = np.random.default_rng(1).normal(1.5, 1.0, (64, 3, 8, 8)).astype(np.float32)
    calib = CalibrationSet.from_arrays(x)
    off = quantize_onnx(tiny_cnn, tmp_path / "off.onnx", calib, CalibrationConfig(method="minmax", bias_correction=False))
    on = quantize_onnx(tiny_cnn, tmp_path / "on.onnx", calib, CalibrationConfig(method="minmax"))
    assert off.notes["bias_corrected"] == [] and on.notes["bias_corrected"] == ["b1", "b2", "b3"]
    assert on.holdout["sqnr_db"] > off.holdout["sqnr_db"] + 2.0
    # the written model carries the corrected bias (int32, scale = input scale * weight scale)
    m = onnx.load(str(tmp_path / "on.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    b1 = inits["b1_quantized"] * inits["b1_quantized_scale"]
    orig = numpy_helper.to_array(next(i for i in onnx.load(str(tiny_cnn)).graph.initializer if i.name == "b1"))
    assert not np.allclose(b1, orig, atol=1e-3)
