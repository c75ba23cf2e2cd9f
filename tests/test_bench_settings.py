"""The benches time with their own settings, not the examples' deploy settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.spec import effective_validation, load_spec, load_target

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("edgeship_bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path / "targets"))
    return module


@pytest.mark.parametrize("workload", ["mobilenet-v2", "digit-detector"])
def test_local_bench_uses_its_runs_table(bench, tmp_path, workload):
    assert load_spec(bench.WORKLOADS[workload]).validation is not None  # the example sets its own
    target = load_target(bench.bench_target(tmp_path, workload, ["onnxruntime"], 7, "local"))
    got = effective_validation(bench.bench_spec(workload), target)
    assert (got.warmup, got.runs, got.rounds) == (*bench.RUNS[workload], 7)


def test_device_bench_uses_few_samples(bench, tmp_path):
    target = load_target(bench.bench_target(tmp_path, "efficientnet-lite0", ["onnxruntime"], 3, "sim-arm64"))
    got = effective_validation(bench.bench_spec("efficientnet-lite0"), target)
    dv = bench.DEVICE_VALIDATION
    assert (got.warmup, got.runs, got.samples, got.rounds) == (dv["warmup"], dv["runs"], dv["samples"], 3)
    # the spec's evaluation (labels, postprocess) is untouched
    assert bench.bench_spec("digit-detector").evaluation == load_spec(bench.WORKLOADS["digit-detector"]).evaluation
