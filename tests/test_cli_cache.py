"""The stage cache and the release folder under damage (issue 11, #12 and #17), through the console
script: a corrupted cache entry is rebuilt, not packaged; a killed build's temp folders go on the
next run; a full disk is one line (exit 1) and leaves the previous cache and release intact."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.cache import sha256_file
from tests.cli_helpers import EDGESHIP, MNIST, cheap_target, edgeship, lines, make_env, spec_with

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


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small real filesystem (root only), unmounted afterwards whatever happens."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(mount: Path, leave_bytes: int) -> Path:
    """Fill ``mount`` until the disk is full, then give back about ``leave_bytes``."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


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
    # A release folder half written by a killed run (the output folder is locked, so it is stale).
    half_release = out / ".release-killed"
    half_release.mkdir(parents=True)
    (half_release / "manifest.json").write_text("{")
    again = edgeship(build_args(tmp_path, out), env)
    assert again.returncode == 0, again.stderr
    assert not left.exists() and not half_release.exists()
    assert temp_folders(stages) == [live]
    release_intact(out / "release")


def test_disk_full_while_packaging_keeps_the_previous_release(tmp_path: Path, env: dict[str, str]) -> None:
    with tmpfs(tmp_path / "small", "8m") as mount:
        out = mount / "build"
        assert edgeship(build_args(tmp_path, out), env).returncode == 0  # a ~5 MB release fits once
        before = release_intact(out / "release")
        # The next release is written beside the old one and does not fit as well.
        changed = cheap_target(tmp_path, "cheapdev2")
        proc = edgeship(build_args(tmp_path, out, target=changed), env)
        assert proc.returncode == 1, proc.stderr
        err = lines(proc.stderr)[-1]
        assert err.startswith(f"edgeship: error: no space left on the disk of {out} while writing the release ("), err
        # the figures are the disk's and the release's own: the estimate is about the size of the
        # release already there (same spec, another target), more than is free, and the advice is
        # the difference, rounded up
        m = re.search(r"\(([\d.]+) MB free, needs at least ([\d.]+) MB\): free (\d+) MB there", err)
        assert m is not None, err
        free_mb, need_mb, more_mb = float(m[1]), float(m[2]), int(m[3])
        old_mb = sum(f.stat().st_size for f in (out / "release").rglob("*") if f.is_file()) / 2**20
        assert 0.8 * old_mb <= need_mb <= 1.25 * old_mb, (need_mb, old_mb)
        assert need_mb > free_mb and abs(more_mb - (need_mb - free_mb)) <= 1.05, err
        assert "Traceback" not in proc.stderr
        assert release_intact(out / "release")["release_id"] == before["release_id"]
        assert not list(out.glob(".release-*"))


def test_disk_full_in_the_stage_cache_keeps_its_entries(tmp_path: Path, env: dict[str, str]) -> None:
    with tmpfs(tmp_path / "small", "2m") as mount:
        env = {**env, "EDGESHIP_STAGE_CACHE": str(mount / "stages")}
        out = tmp_path / "build"
        assert edgeship(build_args(tmp_path, out), env).returncode == 0
        entries = {p: sha256_file(p) for p in (mount / "stages").rglob("*") if p.is_file()}
        filler = fill(mount, 8 * 1024)
        more = cheap_target(tmp_path, "cheapdev-fp16", builds=[{"backend": "onnxruntime",
                                                                "precisions": ["fp32", "fp16"]}])
        proc = edgeship(build_args(tmp_path, tmp_path / "build-fp16", target=more), env)
        assert proc.returncode == 1, proc.stderr
        err = lines(proc.stderr)[-1]
        assert err.startswith(f"edgeship: error: no space left on the disk of {mount / 'stages'} while writing "
                              "the convert stage cache entry ("), err
        assert "Traceback" not in proc.stderr
        assert {p: sha256_file(p) for p in entries} == entries  # every old entry, byte for byte
        assert temp_folders(mount / "stages") == []
        filler.unlink()
        again = edgeship(build_args(tmp_path, out), env)
        assert again.returncode == 0
        assert all(" cached " in ln for ln in again.stderr.splitlines()
                   if ln.startswith(("export onnx", "optimize", "onnxruntime fp32")))
