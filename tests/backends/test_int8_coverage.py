"""INT8 op coverage (issue 15): each runtime's own view of an int8 artifact, through the real
converters, on ``planted_cnn`` (conv -> relu -> conv -> relu -> GAP -> linear) whose second conv's
input only int8 ruins. With the fallback on, the search keeps that conv float and coverage must
name it; with the fallback off every conv is int8. Rendering: the report line and the bench column."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.backends.coverage import artifact_coverage, coverage_cell, coverage_line
from pipeline.registry import get_backend
from tests.backends.helpers import planted_context


def _build(tmp: Path, backend: str, fallback: bool) -> tuple[list[str], dict[str, Any]]:
    tmp.mkdir()
    art = get_backend(backend).convert(planted_context(tmp, backend, fallback), "int8")
    kept = [f["name"] for f in art.info["calibration"]["fallback_layers"]]
    return kept, artifact_coverage(art.runner, art.workdir, art.runner_config)


@pytest.mark.slow
def test_onnxruntime_coverage_is_what_the_session_runs(tmp_path: Path) -> None:
    kept, plain = _build(tmp_path / "plain", "onnxruntime", fallback=False)
    assert kept == []
    # both convs, the pool and the linear layer fuse into integer kernels: the GAP, exported as a
    # ReduceMean that ORT has no int8 kernel for, is written as GlobalAveragePool
    # (writers.qdq.pool_spatial_means), so no Q/DQ is left inside
    assert (plain["int8"], plain["compute_ops"], plain["float_ops"]) == (4, 4, {}), plain
    assert plain["qdq_left"] == 0 and plain["qdq_io"] == 2, plain
    kept, fell = _build(tmp_path / "fallback", "onnxruntime", fallback=True)
    assert kept == ["node_conv2d_1"]
    # the kept conv reads a float input (its Q/DQ is stripped), so the conv before it has no Q on
    # its output left to fuse with and runs float too: one fallback layer costs two int8 convs here
    assert fell["int8"] == 1 and fell["compute_ops"] == 4, fell
    assert sum(n for op, n in fell["float_ops"].items() if "Conv" in op) == 2, fell
    assert "node_mean" in fell["float_layers"]
    line = coverage_line(fell)
    assert line is not None and line.startswith("int8 ops: 1/4, float: ") and "ReduceMean x1" in line


@pytest.mark.slow
def test_ncnn_coverage_names_the_conv_the_fallback_kept_float(tmp_path: Path) -> None:
    kept, plain = _build(tmp_path / "plain", "ncnn", fallback=False)
    assert kept == [] and (plain["int8"], plain["float"], plain["qdq_left"]) == (3, 0, 0), plain
    kept, fell = _build(tmp_path / "fallback", "ncnn", fallback=True)
    assert len(kept) == 1 and fell["float_layers"] == kept, (kept, fell)
    assert (fell["int8"], fell["float_ops"]) == (2, {"Convolution": 1}), fell


@pytest.mark.slow
def test_tflite_coverage_counts_the_convs_the_fallback_left_float(tmp_path: Path) -> None:
    kept, plain = _build(tmp_path / "plain", "tflite", fallback=False)
    assert kept == [] and plain["float"] == 0 and plain["int8"] >= 3, plain
    kept, fell = _build(tmp_path / "fallback", "tflite", fallback=True)
    assert kept == ["2"], kept
    # as on ONNX Runtime, the kept conv's float input leaves the conv before it float too (the
    # first conv has one input channel: TFLite runs it as DEPTHWISE_CONV_2D); GAP and linear stay int8
    assert fell["float_ops"] == {"DEPTHWISE_CONV_2D": 1, "CONV_2D": 1} and fell["int8"] == plain["int8"] - 2, fell
    assert fell["qdq_left"] == plain["qdq_left"] + 1, fell  # the float conv's output quantized for the GAP


def test_tensorrt_coverage_is_unknown_on_the_host_and_read_from_the_engine(tmp_path: Path) -> None:
    cov = artifact_coverage("tensorrt", tmp_path, {"onnx": "model.qdq.onnx"})
    assert "device" in cov["unknown"]
    assert coverage_cell(cov) == "?"
    assert coverage_line(cov, {"precisions": {"int8": 31, "fp16": 2}}) == \
        "int8 layers: 31/33 (the engine built on the device), other: fp16 x2"


COVERAGE = {"compute_ops": 60, "int8": 59, "float": 1, "qdq_left": 2, "qdq_io": 2, "float_ops": {"ReduceMean": 1},
            "float_layers": ["node_mean"], "float_data_ops": {}, "source": "onnxruntime"}


def test_report_md_has_one_coverage_line_per_int8_run() -> None:
    from pipeline.validate.report import markdown

    run = {"id": "onnxruntime-int8", "backend": "onnxruntime", "precision": "int8", "accuracy": 86.0,
           "accuracy_drop_pp": 0.5, "latency_ms": {}, "gate": {"passed": True, "reasons": []},
           "calibration": {"method": "mse", "reason": "best"}, "int8_coverage": COVERAGE}
    fp32 = {**run, "id": "onnxruntime-fp32", "precision": "fp32", "calibration": None, "int8_coverage": None}
    results = {"spec": "s", "target": "t", "runs": [fp32, run], "gate": {"passed": True, "reasons": []},
               "devices": [{"device": "local", "runs": [fp32, run]}]}
    lines = [ln for ln in markdown(results).splitlines() if ln.startswith("int8 ops:")]
    assert lines == ["int8 ops: 59/60, float: ReduceMean x1; Q/DQ left inside: 2 (+2 at the inputs/outputs)"]


def test_bench_table_has_the_int8_ops_column() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench

    row = {"backend": "onnxruntime", "accuracy": 86.0, "accuracy_drop_pp": 0.5, "accuracy_drop_interval": None,
           "top1_agreement": 97.0, "sqnr_db": 23.0, "p50_ms": 7.0, "p90_ms": 8.0, "cv": 0.1, "n": 60,
           "peak_rss_mb": 80.0, "artifact_bytes": 5 << 20, "gate": True, "speedup_vs_fp32": None}
    rows = [{**row, "precision": "fp32", "int8_coverage": None},
            {**row, "precision": "int8", "int8_coverage": COVERAGE, "speedup_vs_fp32": 1.9}]
    report = {"when": "now", "host": "h", "cpu_count": 2, "rounds": 5, "backends_skipped": {},
              "workloads": {"efficientnet-lite0": {"metric": "top1", "reference": {"accuracy": 86.5, "samples": 400},
                                                   "model": {}, "rows": rows}}}
    md = bench.markdown(report).splitlines()
    header = next(ln for ln in md if ln.startswith("| backend"))
    col = header.split(" | ").index("int8 ops")
    cells = [ln.split(" | ")[col] for ln in md if ln.startswith("| onnxruntime")]
    assert cells == ["-", "59/60"]
    assert ("- onnxruntime int8: int8 ops: 59/60, float: ReduceMean x1; Q/DQ left inside: 2 "
            "(+2 at the inputs/outputs)") in md
