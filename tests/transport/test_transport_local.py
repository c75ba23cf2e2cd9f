"""Local transport: the same release store and lock as SSH, in a temp folder, agent in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import open_transport, release_files
from tests.transport.helpers import SPEC, make_release

REPO = Path(__file__).resolve().parents[2]


def test_deploy_switch_rollback_and_unchanged_redeploy(local_target: TargetSpec, tmp_path: Path) -> None:
    a = make_release(tmp_path / "A", "A", 300_000)
    b = make_release(tmp_path / "B", "B", 200_000)
    root = Path(local_target.transport.root)
    with open_transport(local_target) as t:
        first = t.deploy(a, "A")
        assert first["changed"] and first["previous"] is None
        assert first["bytes_moved"] == first["release_bytes"]
        assert t.current() == "A" and os.readlink(root / SPEC / "current") == "releases/A"

        again = t.deploy(a, "A")
        assert again["bytes_moved"] == 0 and not again["changed"]

        second = t.deploy(b, "B")
        assert second["changed"] and second["previous"] == "A" and t.current() == "B"
        # Only the blob and the manifest differ; the agent files are hard-linked from release A.
        assert second["uploaded_files"] == 2 and second["linked_files"] == second["files"] - 2
        assert second["bytes_moved"] < first["bytes_moved"]

        assert t.rollback() == "A" and t.current() == "A"
        assert t.rollback("B") == "B"
        assert sorted(t.releases()) == ["A", "B"]
        assert json.loads(t.read_current_manifest())["release_id"] == "B"
        # The agent runs as a separate process in the current release (cwd and PYTHONPATH).
        probe = t.run_agent(["probe"], timeout_s=60)
        assert probe["arch"] == os.uname().machine

        with pytest.raises(DeviceError, match="not on the device"):
            t.rollback("nope")


def test_keep_releases_prunes_old_but_never_current_or_previous(local_target: TargetSpec, tmp_path: Path) -> None:
    local_target.transport.keep_releases = 1
    with open_transport(local_target) as t:
        for rid in ("r1", "r2", "r3", "r4"):
            info = t.deploy(make_release(tmp_path / rid, rid, 1000), rid)
        assert info["pruned"] == ["r2"]  # r1 went when r3 landed
        assert t.releases() == ["r3", "r4"]
        t.rollback()  # now r3 is current and r4 previous: both kept
        t.deploy(make_release(tmp_path / "r5", "r5", 1000), "r5")
        assert t.releases() == ["r3", "r5"] and t.current() == "r5"


def test_agent_failure_is_a_device_error_with_stderr_tail(local_target: TargetSpec, tmp_path: Path) -> None:
    with open_transport(local_target) as t:
        with pytest.raises(DeviceError, match="no release deployed"):
            t.run_agent(["probe"], timeout_s=30)
        t.deploy(make_release(tmp_path / "A", "A"), "A")
        with pytest.raises(DeviceError, match=r"agent run failed \(exit 2\).*--release"):
            t.run_agent(["run"], timeout_s=30)


def test_release_must_match_its_manifest(tmp_path: Path) -> None:
    rel = make_release(tmp_path / "A", "A")
    (rel / "data" / "blob.bin").write_bytes(b"changed after packaging")
    with pytest.raises(DeviceError, match="changed since packaging"):
        release_files(rel)
    rel = make_release(tmp_path / "B", "B")
    (rel / "stray.txt").write_text("x")
    with pytest.raises(DeviceError, match="stray.txt not in the manifest"):
        release_files(rel)


def test_lock_busy_then_dead_holder_taken_over(local_target: TargetSpec, tmp_path: Path) -> None:
    rel = make_release(tmp_path / "A", "A")
    with open_transport(local_target) as holder, open_transport(local_target, lock_wait_s=0.5) as other:
        with holder.lock(wait_s=5):
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"busy: .* pid \d+ .* holds its deploy lock"):
                other.deploy(rel, "A")
            assert time.monotonic() - t0 < 5
        assert other.deploy(rel, "A")["changed"]

    # A holder that dies without unlocking (kill -9 of the deploying process): flock is released by
    # the kernel, so the next deploy proceeds at once.
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pipeline.spec import load_target; from pipeline.transport import open_transport;"
            "t = load_target('local'); t.transport.root = sys.argv[2];"
            "tr = open_transport(t); lk = tr.lock(5); lk.__enter__(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), local_target.transport.root],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with open_transport(local_target, lock_wait_s=0.5) as t, pytest.raises(DeviceError, match="busy"):
            t.rollback("A")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with open_transport(local_target, lock_wait_s=10) as t:
            assert t.deploy(make_release(tmp_path / "B", "B"), "B")["changed"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_check_names_the_mismatch_and_the_fix(local_target: TargetSpec) -> None:
    with open_transport(local_target) as t:
        probe = t.probe()
        t.check(local_target, probe)  # the host fits the local target
        other = local_target.model_copy(deep=True)
        other.arch = "aarch64" if probe["arch"] != "aarch64" else "x86_64"
        with pytest.raises(DeviceError, match=rf"expects {other.arch} but local .* is {probe['arch']}"):
            t.check(other, probe)
        pinned = local_target.model_copy(deep=True)
        pinned.runtime.packages = {"numpy": "0.0.1", "surely-not-installed-pkg": "1.0"}
        fake = dict(probe, packages={"numpy": "2.0.0", "surely-not-installed-pkg": None})
        with pytest.raises(DeviceError, match=r"numpy 2.0.0 \(want 0.0.1\); surely-not-installed-pkg missing.*"
                                              r"edgeship devices provision local"):
            t.check(pinned, fake)


def test_check_jetson_l4t_and_tensorrt(local_target: TargetSpec) -> None:
    from pipeline.spec import load_target

    orin = load_target("jetson-orin-nano")
    probe = {"arch": "aarch64", "python": "3.10.12", "runtime_python_ok": True,
             "packages": dict(orin.runtime.packages), "jetson": {"l4t": "36.3.0", "tensorrt": "10.3.0"}}
    with open_transport(local_target) as t:
        with pytest.raises(DeviceError, match=r"expects L4T 36.4 but local .* has L4T 36.3.0; flash"):
            t.check(orin, probe)
        t.check(orin, dict(probe, jetson={"l4t": "36.4.0", "tensorrt": "10.3.0"}))
        # a board without TensorRT is deployed: its TensorRT runs fail on the device, with the reason
        t.check(orin, dict(probe, jetson={"l4t": "36.4.3", "tensorrt": None}))
        with pytest.raises(DeviceError, match=r"has no L4T \(not a Jetson\)"):
            t.check(orin, dict(probe, jetson=None))
        with pytest.raises(DeviceError, match=r"needs python >=3.10 but local .* has 3.9.2"):
            t.check(orin, dict(probe, python="3.9.2", jetson={"l4t": "36.4.0", "tensorrt": "10.3.0"}))


def test_redeploy_repairs_a_damaged_release(local_target: TargetSpec, tmp_path: Path) -> None:
    rel = make_release(tmp_path / "A", "A", 100_000)
    root = Path(local_target.transport.root)
    with open_transport(local_target) as t:
        t.deploy(rel, "A")
        blob = root / SPEC / "releases" / "A" / "data" / "blob.bin"
        blob.write_bytes(b"bit rot")  # the device's copy went bad at rest
        fixed = t.deploy(rel, "A")
        assert fixed["changed"] and fixed["bytes_moved"] == fixed["release_bytes"]  # nothing trusted from it
        assert blob.read_bytes() == (rel / "data" / "blob.bin").read_bytes()
        assert t.current() == "A"

        # Same id, intact but repackaged (manifest bytes differ): only the manifest travels.
        manifest = json.loads((rel / "manifest.json").read_text())
        manifest["note"] = "repackaged"
        (rel / "manifest.json").write_text(json.dumps(manifest))
        again = t.deploy(rel, "A")
        assert again["uploaded_files"] == 1 and again["bytes_moved"] == (rel / "manifest.json").stat().st_size
