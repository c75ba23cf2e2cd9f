"""End to end on the ``local`` transport: build, ship to a separate release folder, run the device
agent in a separate process, gate. Real ONNX Runtime, real MNIST digits, no mocks."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]

RUN_FIELDS = ("backend", "precision", "accuracy", "accuracy_drop_pp", "latency_ms", "peak_rss_mb",
              "artifact_bytes", "artifact_sha256", "gate")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A target extending ``local`` whose device folder lives in tmp, and an isolated stage cache."""
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "testdev.yaml").write_text(yaml.safe_dump({
        "extends": "local", "transport": {"root": str(tmp_path / "device")},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32", "int8"]}],
        "validation": {"warmup": 2, "runs": 20}}))
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(targets))
    monkeypatch.setenv("EDGESHIP_STAGE_CACHE", str(tmp_path / "stages"))
    return tmp_path


def _spec_with(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_deploy_local_passes_and_writes_results(workspace: Path) -> None:
    out = workspace / "results.json"
    rc = main(["deploy", "--spec", str(ROOT / "examples" / "mnist.yaml"), "--target", "testdev",
               "--out", str(workspace / "build"), "--json", str(out), "--junit", str(workspace / "junit.xml")])
    assert rc == 0
    junit = ET.parse(workspace / "junit.xml").getroot()  # one case per run, none failed
    assert (junit.get("tests"), junit.get("failures"), junit.get("errors")) == ("2", "0", "0")
    res = json.loads(out.read_text())
    assert res["gate"]["passed"] is True and res["gate"]["reasons"] == []
    assert {r["precision"] for r in res["runs"]} == {"fp32", "int8"}
    for run in res["runs"]:
        for field in RUN_FIELDS:
            assert field in run, field
        assert run["latency_ms"]["runs"] == 20
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p90"] <= run["latency_ms"]["p99"]
        assert 0 < run["peak_rss_mb"] < 4096
        assert len(run["artifact_sha256"]) == 64
        assert run["accuracy_drop_pp"] <= res["budget_pp"]
        iv = run["accuracy_drop_interval"]  # paired with fp32 on the same samples, from the agent's predictions
        assert iv["n"] == 1500 and iv["drop_pp"] == pytest.approx(run["accuracy_drop_pp"], abs=1e-3)
        assert iv["low_pp"] <= iv["drop_pp"] <= iv["high_pp"]
    fp32 = next(r for r in res["runs"] if r["precision"] == "fp32")
    int8 = next(r for r in res["runs"] if r["precision"] == "int8")
    assert fp32["accuracy"] == pytest.approx(res["reference"]["accuracy"], abs=1e-6)
    assert int8["artifact_bytes"] < fp32["artifact_bytes"]  # int8 weights are smaller
    cov = int8["int8_coverage"]  # what ONNX Runtime's session runs in int8 (issue 15)
    assert fp32["int8_coverage"] is None and cov["int8"] >= 3 and cov["compute_ops"] == cov["int8"] + cov["float"]
    assert f"int8 ops: {cov['int8']}/{cov['compute_ops']}" in (workspace / "build" / "report.md").read_text()
    assert "<img" in (workspace / "build" / "report.html").read_text()  # beside report.md
    # The release is on the "device": a separate folder, switched atomically.
    current = workspace / "device" / "mnist-cnn" / "current"
    assert current.is_symlink() and json.loads((current / "manifest.json").read_text())["release_id"] == res["release_id"]

    # Unchanged: the second deploy hits every cache and moves no bytes.
    out2 = workspace / "results2.json"
    assert main(["deploy", "--spec", str(ROOT / "examples" / "mnist.yaml"), "--target", "testdev",
                 "--out", str(workspace / "build"), "--json", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert all(s["cached"] for s in res2["stages"] if s["stage"].startswith(("export", "optimize", "onnxruntime")))
    assert res2["devices"][0]["deploy"]["bytes_moved"] == 0
    assert res2["release_id"] == res["release_id"]


def test_gate_fails_on_model_calibrated_on_noise_and_rolls_back(workspace: Path) -> None:
    good_json = workspace / "good.json"
    assert main(["deploy", "--spec", str(ROOT / "examples" / "mnist.yaml"), "--target", "testdev",
                 "--out", str(workspace / "build"), "--json", str(good_json)]) == 0
    good_id = json.loads(good_json.read_text())["release_id"]

    # Calibrated on noise with a tiny range: activations on real digits clip, accuracy collapses.
    noise = np.random.default_rng(0).normal(0, 0.01, size=(64, 1, 28, 28)).astype(np.float32)
    np.savez(workspace / "noise.npz", x=noise)
    broken = _spec_with(workspace, calibration__source={"kind": "npz", "path": str(workspace / "noise.npz")},
                        calibration__method="minmax", calibration__fallback=False)
    bad_json = workspace / "bad.json"
    rc = main(["deploy", "--spec", str(broken), "--target", "testdev", "--out", str(workspace / "build-bad"),
               "--json", str(bad_json)])
    assert rc == 3
    res = json.loads(bad_json.read_text())
    assert res["gate"]["passed"] is False
    assert any("int8" in r and "exceeds the budget" in r for r in res["gate"]["reasons"])
    int8 = next(r for r in res["runs"] if r["precision"] == "int8")
    assert int8["accuracy_drop_pp"] > 1.0
    dev = res["devices"][0]
    assert dev["rolled_back"] is True and dev["rolled_back_to"] == good_id
    current = workspace / "device" / "mnist-cnn" / "current"
    assert json.loads((current / "manifest.json").read_text())["release_id"] == good_id


def test_agent_prints_json_document(workspace: Path) -> None:
    """The agent alone, in its own process, with nothing of ours but its own package."""
    import subprocess
    import sys

    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_spec, load_target

    result = build(load_spec(ROOT / "examples" / "mnist.yaml"), load_target("testdev"), workspace / "b",
                   cache=Cache(workspace / "stages"), log=lambda m: None)
    # Shadow our own packages so any import of them from the agent fails loudly: the agent must
    # need nothing of ours but itself (plus numpy and the runtime).
    shadow = workspace / "shadow"
    for pkg in ("pipeline", "calibration"):
        (shadow / pkg).mkdir(parents=True)
        (shadow / pkg / "__init__.py").write_text(f"raise ImportError('the agent imported {pkg}')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{result.release_dir}:{shadow}"}
    proc = subprocess.run([sys.executable, "-m", "edgeship_agent", "run", "--release", "."],
                          cwd=result.release_dir, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["device"]["arch"] and doc["device"]["runtimes"]["onnxruntime"]
    assert [r["id"] for r in doc["results"]] == ["onnxruntime-fp32", "onnxruntime-int8"]
    for r in doc["results"]:
        assert r["error"] is None and r["samples"] == 1500 and len(r["predictions"]) == 1500
        assert 90.0 < r["accuracy"] <= 100.0 and r["latency_ms"]["runs"] == 20
    # The agent measured what it says: its fp32 predictions are the host reference's argmax.
    ref = np.load(result.release_dir / "data" / "reference.npy").argmax(1)
    assert np.array_equal(np.array(doc["results"][0]["predictions"]), ref)


def test_bad_spec_exit_code_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {factory: a:b}\n")
    assert main(["build", "--spec", str(bad), "--target", "local"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "Traceback" not in err


def test_nightly_keeps_history_and_catches_a_regression(workspace: Path) -> None:
    history = workspace / "history"
    args = ["nightly", "--spec", str(ROOT / "examples" / "mnist.yaml"), "--target", "testdev",
            "--out", str(workspace / "nightly"), "--history", str(history)]
    assert main(args) == 0
    hist = history / "mnist-cnn" / "testdev.jsonl"
    first = json.loads(hist.read_text().splitlines()[0])
    assert first["passed"] is True and first["regressions"] == []
    # Each night is traced to its code and conditions, and keeps the raw timings the next night's
    # latency rule compares with.
    assert first["versions"]["edgeship"] and "commit" in first["versions"] and first["versions"]["onnxruntime"]
    dev = first["devices"][0]
    assert dev["probe"]["arch"] and len(dev["runs"][0]["timings_ms"]) == dev["runs"][0]["latency_ms"]["runs"]
    # A past good night that was 0.8 pp better than tonight can be: tonight must be flagged, even
    # though tonight is inside the 1.0 pp budget.
    better = json.loads(json.dumps(first))
    for dev in better["devices"]:
        for row in dev["runs"]:
            row["accuracy"] = row["accuracy"] + 0.8
    hist.write_text(json.dumps(better) + "\n")
    assert main(args) == 3
    last = json.loads(hist.read_text().splitlines()[-1])
    assert last["passed"] is False and last["gate"]["passed"] is True
    assert any("below the last good run" in r for r in last["regressions"])
