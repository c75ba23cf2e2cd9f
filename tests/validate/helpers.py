"""Results documents built in code the way pipeline/deploy.py builds them (real gate rows)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.spec import PipelineSpec, TargetSpec
from pipeline.validate.gate import budget_pp, check_run, combine, run_row
from pipeline.validate.report import RESULTS_SCHEMA


def spec(budget: float = 1.0) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "mnist-cnn", "model": {"factory": "a:b"}, "input": {"shape": [1, 4]},
        "calibration": {"source": {"kind": "python", "callable": "a:b"}},
        "evaluation": {"source": {"kind": "python", "callable": "a:b"}},
        "accuracy": {"max_drop_pp": budget}})


def target(**limits: Any) -> TargetSpec:
    return TargetSpec.model_validate({"name": "lab", "arch": "x86_64", "builds": [{"backend": "onnxruntime"}],
                                      "limits": limits, "hardware": {"tdp_w": 5.0}})


def row(backend: str, precision: str, acc: float, *, p90: float = 1.0, size: int = 40_000,
        error: str | None = None, seed: int = 0, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """One gated run row; latency percentiles from ``raw_timings(p90, seed)``."""
    raw_ms = raw_timings(p90, seed)
    lat = {"p50": float(np.percentile(raw_ms, 50)), "p90": p90, "p99": float(np.percentile(raw_ms, 99)),
           "runs": 100, "warmup": 10}
    raw = {"accuracy": acc, "top1_agreement": 99.0, "sqnr_db": 30.0, "peak_rss_mb": 80.0, "baseline_rss_mb": 40.0,
           "latency_ms": lat, "error": error}
    meta = {"id": f"{backend}-{precision}", "backend": backend, "precision": precision, "artifact_bytes": size,
            "artifact_sha256": "0" * 64, "conversion": {"calibration": calibration} if calibration else {}}
    return run_row(raw, meta, {"accuracy": 98.0}, "top1", 5.0)


def raw_timings(p90: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seeded raw timings (ms) around p90 / 1.1, CV ~ 5 %."""
    return (p90 / 1.1) * np.random.default_rng(seed).lognormal(0.0, 0.05, 100)


def results(devices: list[tuple[str, list[dict[str, Any]]]], *, budget: float = 1.0,
            device_error: str | None = None, **limits: Any) -> dict[str, Any]:
    """A results document; ``device_error`` adds a device that could not be measured."""
    s, t = spec(budget), target(**limits)
    devs = []
    for name, rows in devices:
        gates = [check_run(r, s, t) for r in rows]
        devs.append({"device": name, "deploy": {"release_id": "ab" * 32, "bytes_moved": 1234, "changed": True},
                     "probe": {"arch": "x86_64", "os": "Linux", "python": "3.11.2", "cpu_count": 2},
                     "runs": rows, "gate": combine(gates), "rolled_back": False, "error": None})
    if device_error:
        devs.append({"device": "sim-arm64", "error": device_error, "runs": [],
                     "gate": {"passed": False, "reasons": [f"sim-arm64: {device_error}"]}})
    return {"schema": RESULTS_SCHEMA, "spec": s.name, "target": t.name, "release_id": "ab" * 32,
            "reference": {"metric": "top1", "accuracy": 98.0, "samples": 1500}, "budget_pp": budget_pp(s, t),
            "model": {"params": 23950, "flops": 3839744}, "stages": [], "devices": devs,
            "runs": devs[0]["runs"] if devs else [], "gate": combine([d["gate"] for d in devs]),
            "deploy_seconds": 12.5}
