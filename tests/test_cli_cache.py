"""The stage cache under damage (issue 11, #17), through the console script: a corrupted cache
entry is rebuilt, not packaged; a killed build's temp folders go on the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cache import sha256_file
from tests.cli_helpers import EDGESHIP, MNIST, cheap_target, edgeship, make_env, spec_with

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


def build_args(tmp_path: Path, out: Path, target: Path | None = None, spec: Path = MNIST) -> list[str]:
    return ["build", "--spec", str(spec), "--target", str(target or cheap_target(tmp_path)), "--out", str(out)]


def release_intact(release: Path) -> dict:
    manifest = json.loads((release / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert sha256_file(release / name) == digest, name
    return manifest


def temp_folders(stages: Path) -> list[Path]:
    return [p for p in stages.glob("*/*/.*") if p.is_dir()]


def test_a_corrupted_cache_entry_is_rebuilt_not_packaged(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "build"
    first = edgeship(build_args(tmp_path, out), env)
    assert first.returncode == 0, first.stderr
    good = release_intact(out / "release")
    stages = Path(env["EDGESHIP_STAGE_CACHE"])
    (model,) = [p for p in stages.glob("convert/*/*/model.onnx")]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight
    model.write_bytes(bytes(data))

    again = edgeship(build_args(tmp_path, out), env)
    assert again.returncode == 0, again.stderr
    log = [ln for ln in again.stderr.splitlines() if ln.startswith("onnxruntime fp32")]
    assert len(log) == 1 and "built" in log[0] and "corrupted" in log[0] and "rebuilt" in log[0], again.stderr
    rebuilt = release_intact(out / "release")
    assert rebuilt["release_id"] == good["release_id"]  # the same bytes as the good build
    assert model.read_bytes() != bytes(data)  # the cache entry itself was repaired
    assert sha256_file(model) == sha256_file(out / "release" / "artifacts" / "onnxruntime-fp32" / model.name)


def test_temp_folders_of_a_killed_build_are_removed_by_the_next_run(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "build"
    stages = Path(env["EDGESHIP_STAGE_CACHE"])
    slow = spec_with(tmp_path, "slow-export", model={"factory": "slowmod:model"})  # blocks inside the export
    proc = subprocess.Popen([str(EDGESHIP), *build_args(tmp_path, out, spec=slow)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not temp_folders(stages) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert temp_folders(stages), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGKILL)  # no cleanup code runs
    proc.communicate(timeout=60)
    (left,) = temp_folders(stages)
    assert left.is_dir() and f"-{proc.pid}-" in left.name

    # A live builder's temp folder is not touched by the sweep.
    live = left.parent / f".tmp-{os.getpid()}-000000000000-live"
    live.mkdir()
    again = edgeship(build_args(tmp_path, out), env)
    assert again.returncode == 0, again.stderr
    assert not left.exists()
    assert temp_folders(stages) == [live]
