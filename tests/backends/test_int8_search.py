"""The one INT8 search through each candidate builder on the planted model (tests/backends/helpers
``planted_cnn``: the second conv reads a channel scaled x300): the ONNX Runtime QDQ builder and a
test-only fourth backend (demo_backend.py, on the QDQ writer) keep exactly that layer float to
meet a 10 pp budget, and say so when the fallback is off. ncnn and TFLite run the same planted
test in their own files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.registry import get_backend
from tests.backends.helpers import planted_context


def second_conv(onnx_path: Path) -> str:
    from calibration.graph import ensure_node_names, load_model, weighted_layers

    model = load_model(onnx_path)
    ensure_node_names(model)
    layers = weighted_layers(model)
    assert [layer.op for layer in layers] == ["Conv", "Conv", "Gemm"], layers
    return layers[1].node


@pytest.mark.slow
@pytest.mark.backend("onnxruntime")
@pytest.mark.parametrize("fallback", [True, False])
def test_onnxruntime_keeps_the_planted_layer_float(tmp_path: Path, fallback: bool) -> None:
    ctx = planted_context(tmp_path, "onnxruntime", fallback, close_islands=True)
    art = get_backend("onnxruntime").convert(ctx, "int8")
    cal = art.info["calibration"]
    if not fallback:  # the planted layer ruins the holdout: the report says so (and the gate fails it);
        # the written model is the one the search scored, so the conversion's check passes
        assert cal["budget_met"] is False and "fallback is off" in cal["budget_reason"], cal
        check = art.info["check"]["metric"]
        assert abs(check["value"] - cal["holdout"]["top1_agreement"]) <= check["tolerance"], check
        return
    assert cal["method_scores"][cal["method"]]["drop_pp"] > 10.0  # the planted channel ruins every method
    assert cal["budget_met"] is True and cal["holdout"]["drop_pp"] <= 10.0, cal["holdout"]
    chosen = [f["name"] for f in cal["fallback_layers"]]
    assert chosen[0] == second_conv(ctx.onnx_fp32), cal["fallback_layers"]
    # the rest are the int8 runs left between float layers that cost ONNX Runtime more in
    # crossings than they save (on this 8x8 toy: the 3-channel stem and the classifier)
    assert chosen[1:] == cal["islands_closed"] and set(chosen[1:]) <= {"node_conv2d", "node_linear"}, cal
    assert cal["fallback_layers"][0]["saved_db"] > 10.0 and cal["fallback_layers"][0]["sqnr_db"] is not None
    assert [k for k, _ in cal["fallback_tried"]] == [1] and cal["notes"]["format"] == "QDQ ONNX"


@pytest.mark.slow
@pytest.mark.parametrize("fallback", [True, False])
def test_a_fourth_backend_brings_only_candidates(tmp_path: Path, fallback: bool) -> None:
    from calibration.api import run_onnx

    from calibration.search import Holdout

    from pipeline.backends.calibrate import run_search, split
    from tests.backends.demo_backend import CFG, DemoBuilder

    ctx = planted_context(tmp_path, "onnxruntime", fallback)
    fit, hold = split(ctx)
    builder = DemoBuilder(ctx.onnx_fp32, fit, tmp_path)
    holdout = Holdout({"input": hold.samples}, hold.labels)
    reference = run_onnx(builder.src, holdout.x, CFG)
    found = run_search(ctx, builder, holdout, reference, ("minmax", "percentile"), len(fit), time.perf_counter())
    rep = found.report
    assert set(rep.method_scores) == {"minmax", "percentile"} and rep.method in rep.reason
    if not fallback:
        assert rep.budget_met is False and "fallback is off" in rep.budget_reason
        return
    assert rep.budget_met is True and [f.name for f in rep.fallback_layers] == [second_conv(ctx.onnx_fp32)]
    assert found.candidate.float_layers == (rep.fallback_layers[0].name,)
    out = tmp_path / "artifact"
    out.mkdir()
    assert found.candidate.write(out) == ["demo.onnx"]
    got = run_onnx(out / "demo.onnx", holdout.x, CFG)["logits"]
    np.testing.assert_allclose(got, found.candidate.run(holdout.x)["logits"])
