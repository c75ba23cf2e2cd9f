"""The README's "Your own model and data", followed by a newcomer: its fenced model module and
spec block are written verbatim, images are laid out as its folder tree says, and the real
console script builds it first time (shared/decisions.md: a README spec test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
EDGESHIP = Path(sys.executable).with_name("edgeship")
SECTION = "### Your own model and data"


def _blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start)
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], flags=re.DOTALL)


def _photos(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):  # photos of several sizes and aspects, as a camera folder has
        h, w = int(rng.integers(180, 400)), int(rng.integers(180, 400))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.jpg")


def test_readme_model_and_image_folder_build_first_time(tmp_path: Path) -> None:
    (module,) = _blocks("python")
    (spec_text,) = _blocks("yaml")
    assert module.startswith("# mymodel.py\n") and spec_text.startswith("# spec.yaml\n")
    project = tmp_path / "my-project"
    project.mkdir()
    (project / "mymodel.py").write_text(module)
    (project / "spec.yaml").write_text(spec_text)
    (project / "classes.txt").write_text("cat\ndog\nfox\n")
    for i, name in enumerate(("cat", "dog", "fox")):
        _photos(project / "images" / "calibration" / name, 4, seed=i)
    _photos(project / "images" / "evaluation" / "dog", 3, seed=10)  # a folder holding one class only
    target = tmp_path / "cheap.yaml"  # one cheap build: the test is about the spec, not the runtimes
    target.write_text(yaml.safe_dump({"extends": "local", "name": "cheap",
                                      "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}]}))
    env = {**os.environ, "EDGESHIP_HOME": str(tmp_path / "home"), "EDGESHIP_STAGE_CACHE": str(tmp_path / "stages")}
    env.pop("PYTHONPATH", None)  # mymodel.py is found beside the spec, not through PYTHONPATH
    proc = subprocess.run([str(EDGESHIP), "build", "--spec", "spec.yaml", "--target", str(target)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "edgeship: error" not in proc.stderr
    out = proc.stdout + proc.stderr  # stage lines are the log (stderr)
    assert re.search(r"load calibration set .* 12 samples", out), out
    release = next((project / "build").rglob("release/data/y.npy")).parent
    # classes_file numbers the lone dog/ folder 1, as the model's outputs do; listing it would say 0
    assert np.load(release / "y.npy").tolist() == [1, 1, 1]
    # the photos ship as their uint8 224 x 224 crops (HWC), the device normalises them to NCHW
    with np.load(release / "x.npz", allow_pickle=False) as npz:
        assert npz["shape"].tolist() == [3, 224, 224, 3] and npz["0"].dtype == np.uint8
    assert not (release / "x.npy").exists()
