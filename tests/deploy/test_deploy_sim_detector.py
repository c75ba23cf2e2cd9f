"""The detector example on the emulated aarch64 device (issue 13): every CPU backend at fp32, fp16
and int8 runs there over real SSH, the device returns the decoded detections and the host scores
them with COCO mAP; the gate (mAP drop within the spec's 1.0 point budget) passes.

Cost: the detector's build (its training is cached by recipe hash; the conversions go to the
session's stage cache) and SAMPLES canvases x 9 runs under QEMU user emulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.metrics import BUILTIN

ROOT = Path(__file__).resolve().parents[2]
DETECTOR = ROOT / "examples" / "detector.yaml"
CPU_BACKENDS = ("onnxruntime", "tflite", "ncnn")
SAMPLES = 64  # the first 64 of the 512 evaluation canvases (int8 drops 0.15-0.46 mAP there)
pytestmark = [pytest.mark.device, pytest.mark.slow, *(pytest.mark.backend(b) for b in CPU_BACKENDS)]


def _spec(ws: Path) -> Path:
    """examples/detector.yaml, measured on SAMPLES canvases with few timed runs."""
    data = yaml.safe_load(DETECTOR.read_text())
    data["validation"] = {"warmup": 1, "runs": 5, "samples": SAMPLES}
    path = ws / "detector-sim.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _target(ws: Path) -> str:
    (ws / "targets" / "det-arm.yaml").write_text(yaml.safe_dump({
        "name": "det-arm", "extends": "sim-arm64", "threads": 2,
        "transport": {"known_hosts": str(ws / "known_hosts"), "command_timeout_s": 1200},
        "builds": [{"backend": b, "precisions": ["fp32", "fp16", "int8"]} for b in CPU_BACKENDS]}))
    return "det-arm"


def test_detector_deploys_to_arm64_with_every_cpu_backend(sim_workspace: Path) -> None:
    out, doc = sim_workspace / "build" / "det-arm", sim_workspace / "results-det-arm.json"
    rc = main(["deploy", "--spec", str(_spec(sim_workspace)), "--target", _target(sim_workspace),
               "--out", str(out), "--json", str(doc)])
    results = json.loads(doc.read_text())
    assert rc == 0 and results["gate"]["passed"], results["gate"]
    [dev] = results["devices"]
    assert dev["error"] is None and dev["device_info"]["arch"] == "aarch64"
    ref = results["reference"]
    assert ref["metric"] == "map" and ref["samples"] == SAMPLES
    rows = {r["id"]: r for r in dev["runs"]}
    assert set(rows) == {f"{b}-{p}" for b in CPU_BACKENDS for p in ("fp32", "fp16", "int8")}
    labels = json.loads((out / "evaluation" / "labels.json").read_text())["objects"]
    with np.load(out / results["outputs_file"]) as side:
        for rid, row in rows.items():
            assert row["gate"]["passed"] and row["latency_ms"]["runs"] == 5 and row["latency_ms"]["p50"] > 0, rid
            # the figures are the host's mAP of the detections this run returned from the device
            outputs = {k: side[f"{dev['device']}/{rid}/{k}"] for k in ("boxes", "scores", "classes")}
            assert outputs["boxes"].shape == (SAMPLES, 20, 4)
            score = BUILTIN["map"].evaluate(outputs, labels)
            assert row["accuracy"] == pytest.approx(score.value, abs=1e-3) and row["metrics"] == score.extras, rid
            assert row["accuracy_drop_pp"] <= 1.0 and ref["metrics"]["map50"] - row["metrics"]["map50"] <= 1.0, rid
