"""`edgeship validate` re-hashes the deployed files before measuring (issue 11 #5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.cli import MNIST, edgeship, env_for, last_line, local_target

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def test_validate_refuses_a_flipped_byte_naming_the_file(tmp_path: Path) -> None:
    env = env_for(tmp_path, tmp_path / "stages")
    device = tmp_path / "device"
    target = local_target(tmp_path, device)
    args = ["--spec", str(MNIST), "--target", str(target), "--out", str(tmp_path / "build")]
    dep = edgeship(["deploy", *args], env)
    assert dep.returncode == 0, dep.stderr
    ok = edgeship(["validate", *args], env)
    assert ok.returncode == 0, ok.stderr  # an intact release validates
    # This host built the release it validates: each run's drop is paired with fp32 on its data.
    found = list((tmp_path / "build").rglob("results.json"))
    valid = json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())
    assert all(r["accuracy_drop_interval"]["n"] == 1500 for r in valid["runs"])
    assert valid["versions"]["edgeship"]

    models = sorted((device / "mnist-cnn" / "current").resolve().rglob("*.onnx"))
    assert models, "the release ships an ONNX model"
    model = models[0]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    model.write_bytes(data)
    rel = model.relative_to((device / "mnist-cnn" / "current").resolve()).as_posix()

    bad = edgeship(["validate", *args], env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    line = last_line(bad.stderr)
    assert line.startswith("edgeship: error: ") and f"is damaged: {rel} does not match the manifest's sha256" in line
    assert "Traceback" not in bad.stderr
    found = list((tmp_path / "build").rglob("results.json"))
    results = json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())
    assert results["gate"]["passed"] is False and results["devices"][0]["runs"] == []
