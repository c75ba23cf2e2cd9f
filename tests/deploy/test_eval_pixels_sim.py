"""Image evaluation data shipped as uint8 and normalised by the agent on the emulated aarch64
board (QEMU, real sshd): its numpy gives the host's float32 bits, so its fp32 run scores exactly
the host's fp32 reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.test_eval_pixels_deploy import image_project

pytestmark = [pytest.mark.device, pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def test_arm64_agent_normalises_the_pixels_as_the_host(sim_workspace: Path, tmp_path: Path) -> None:
    spec = image_project(tmp_path, resize_shorter=28, center_crop=[24, 24], scale=0.00392156862745098,
                         mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    (sim_workspace / "targets" / "px-arm.yaml").write_text(yaml.safe_dump({
        "name": "px-arm", "extends": "sim-arm64", "transport": {"known_hosts": str(sim_workspace / "known_hosts")},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}], "validation": {"warmup": 1, "runs": 3}}))
    out = tmp_path / "results.json"
    assert main(["deploy", "--spec", str(spec), "--target", "px-arm", "--out", str(tmp_path / "build"),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["devices"][0]["device_info"]["arch"] == "aarch64"
    manifest = json.loads((tmp_path / "build" / "release" / "manifest.json").read_text())
    assert "data/x.npz" in manifest["files"] and "data/x.npy" not in manifest["files"]
    [run] = res["runs"]
    assert run["accuracy"] == res["reference"]["accuracy"] and run["accuracy_drop_pp"] == 0.0
