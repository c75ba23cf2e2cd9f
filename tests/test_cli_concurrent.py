"""Two runs on one output folder (issue 11, #10): the second is refused with one line naming the
holder; the first finishes and its release is intact. Real console scripts, in parallel."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cache import sha256_file
from tests.cli_helpers import EDGESHIP, MNIST, cheap_target, edgeship, lines, make_env

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


def _wait_for_holder(lock: Path, proc: subprocess.Popen[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.is_file() and f"pid {proc.pid}" in lock.read_text():
            return lock.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named pid {proc.pid}: {proc.communicate(timeout=30)}")


def _release_intact(release: Path) -> str:
    manifest = json.loads((release / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert sha256_file(release / name) == digest, name
    return manifest["release_id"]


def test_second_deploy_of_the_same_folder_is_refused_and_the_first_succeeds(
        tmp_path: Path, env: dict[str, str]) -> None:
    target = cheap_target(tmp_path)
    out = tmp_path / "build"
    args = ["deploy", "--spec", str(MNIST), "--target", str(target), "--out", str(out)]
    first = subprocess.Popen([str(EDGESHIP), *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = _wait_for_holder(out / ".lock", first)
    assert holder.startswith("edgeship deploy (pid ")
    started = time.monotonic()
    second = edgeship(args, env, timeout=120)
    assert time.monotonic() - started < 60  # refused after a short wait, not after the first finished
    assert first.poll() is None, "the first deploy ended before the second was refused: the test proves nothing"
    assert second.returncode == 1, second.stderr
    err = lines(second.stderr)
    assert len(err) == 1, second.stderr
    assert err[0] == (f"edgeship: error: {out} is in use by {holder}; wait for it to finish, "
                      "or give this run another --out")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    release_id = _release_intact(out / "release")
    current = tmp_path / "device" / "mnist-cnn" / "current"
    assert json.loads((current / "manifest.json").read_text())["release_id"] == release_id
    # Once the first is done, the folder is free again.
    assert edgeship(args, env).returncode == 0


def test_a_killed_build_leaves_no_lock_behind(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "build"
    args = ["build", "--spec", str(MNIST), "--target", str(cheap_target(tmp_path)), "--out", str(out)]
    first = subprocess.Popen([str(EDGESHIP), *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_holder(out / ".lock", first)
    first.send_signal(signal.SIGKILL)  # no finally, no cleanup: only the kernel releases the flock
    first.communicate(timeout=60)
    proc = edgeship(args, env)
    assert proc.returncode == 0, proc.stderr
    _release_intact(out / "release")
