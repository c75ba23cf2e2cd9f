"""An image-folder spec deployed to ``local`` through the real CLI: the release ships the evaluation
set as uint8 pixels (no float array), the agent normalises them in its own process, and its fp32
run scores exactly what the host's fp32 reference scored, prediction for prediction."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]

MODEL = '''
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))
'''


def _photos(folder: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(("cat", "dog", "fox")):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            tint = np.array([80 * c, 120, 200 - 80 * c])
            img = np.clip(rng.normal(tint, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / name / f"{i}.jpg")


def image_project(tmp_path: Path, **preprocessing: object) -> Path:
    """A model module, two image folders and a spec reading them (the target ``dev``: ``local``)."""
    project = tmp_path / "proj"
    project.mkdir(parents=True)
    (project / "mymodel.py").write_text(MODEL)
    _photos(project / "cal", 1)
    _photos(project / "ev", 2)
    spec = {"name": "pixels", "model": {"factory": "mymodel:build"},
            "input": {"name": "input", "shape": [1, 3, 24, 24], "layout": "NCHW"},
            "preprocessing": preprocessing,
            "calibration": {"source": {"kind": "images", "path": "cal"}},
            "evaluation": {"source": {"kind": "images", "path": "ev"}, "metric": "top1"},
            "accuracy": {"max_drop_pp": 100.0}}
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "dev.yaml").write_text(yaml.safe_dump({
        "extends": "local", "name": "dev", "transport": {"root": str(tmp_path / "device")},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}], "validation": {"warmup": 1, "runs": 3}}))
    return project / "spec.yaml"


def test_image_release_ships_uint8_and_the_device_scores_as_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = image_project(tmp_path, resize_shorter=28, center_crop=[24, 24], color="bgr", scale=1.0,
                    mean=[120.0, 110.0, 100.0], std=[60.0, 64.0, 58.0])
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path / "targets"))
    monkeypatch.setenv("EDGESHIP_STAGE_CACHE", str(tmp_path / "stages"))
    monkeypatch.setenv("EDGESHIP_HOME", str(tmp_path / "home"))
    out = tmp_path / "results.json"
    assert main(["deploy", "--spec", str(spec), "--target", "dev", "--out", str(tmp_path / "build"),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    release = tmp_path / "build" / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert sorted(p.name for p in (release / "data").iterdir()) == ["reference.npy", "x.npz", "y.npy"]
    with zipfile.ZipFile(release / "data" / "x.npz") as z:  # 12 deflated uint8 samples + their shape
        assert len(z.namelist()) == 13 and all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    with np.load(release / "data" / "x.npz", allow_pickle=False) as npz:
        assert npz["0"].dtype == np.uint8 and npz["shape"].tolist() == [12, 24, 24, 3]
    assert manifest["agent"]["pixels"]["x"] == {
        "encoding": "uint8-sub-deflate", "dtype": "float32", "scale": 1.0, "mean": [120.0, 110.0, 100.0],
        "std": [60.0, 64.0, 58.0], "layout": "NCHW", "stride": 3}
    # the device's fp32 run scores what the host's fp32 reference scored
    [run] = res["runs"]
    assert run["accuracy"] == res["reference"]["accuracy"] and run["accuracy_drop_pp"] == 0.0
    # prediction for prediction, with the agent alone (our packages shadowed: it imports neither)
    shadow = tmp_path / "shadow"
    for pkg in ("pipeline", "calibration"):
        (shadow / pkg).mkdir(parents=True)
        (shadow / pkg / "__init__.py").write_text(f"raise ImportError('the agent imported {pkg}')\n")
    proc = subprocess.run([sys.executable, "-m", "edgeship_agent", "run", "--release", "."], cwd=release,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{release}:{shadow}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [agent] = json.loads(proc.stdout)["results"]
    reference = np.load(release / "data" / "reference.npy")
    assert agent["error"] is None and agent["predictions"] == reference.argmax(1).tolist()
    assert agent["sqnr_db"] > 100.0  # the same input bits: fp32 outputs agree to rounding

    # another recipe is another release (the recipe is part of the release id)
    spec2 = image_project(tmp_path / "b", resize_shorter=28, center_crop=[24, 24], color="bgr", scale=1.0,
                     mean=[120.0, 110.0, 100.0], std=[60.0, 64.0, 59.0])
    assert main(["build", "--spec", str(spec2), "--target", "dev", "--out", str(tmp_path / "build2")]) == 0
    other = json.loads((tmp_path / "build2" / "release" / "manifest.json").read_text())
    assert other["release_id"] != manifest["release_id"] and other["agent"]["pixels"]["x"]["std"][2] == 59.0
