"""SSH transport against a real sshd (127.0.0.5), real Fabric: deploy, resume, verify, disk, lock."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import for_each_host, open_transport
from tests.transport.helpers import SPEC, make_release, snapshot

pytestmark = pytest.mark.device
MiB = 1 << 20


def test_deploy_probe_check_and_agent(ssh_target: Callable[..., TargetSpec], tmp_path: Path) -> None:
    target = ssh_target()
    root = Path(target.transport.root)
    with open_transport(target) as t:
        probe = t.probe()
        assert probe["arch"] == target.arch and probe["runtime_python_ok"]
        assert probe["disk_free_mb"] > 0 and probe["python"].startswith("3.")
        t.check(target, probe)

        rel = make_release(tmp_path / "A", "A", 2 * MiB)
        first = t.deploy(rel, "A")
        assert first["changed"] and first["bytes_moved"] == first["release_bytes"]
        assert (root / SPEC / "current").resolve() == root / SPEC / "releases" / "A"
        assert t.deploy(rel, "A")["bytes_moved"] == 0  # unchanged: nothing uploaded

        out = t.run_agent(["probe"], timeout_s=60)  # edgeship_agent from the release, on the device
        assert out["arch"] == probe["arch"]
        # The device checked the files: its list matches what sha256sum computes there.
        sums = subprocess.run(["sha256sum", "-c", "--quiet", ".edgeship-sha256sums"], cwd=root / SPEC / "releases" / "A")
        assert sums.returncode == 0


def test_fleet_helper_runs_per_host_bounded(ssh_target: Callable[..., TargetSpec]) -> None:
    target = ssh_target()
    ghost = target.transport.hosts[0].model_copy(update={"name": "ghost", "port": 1})  # nothing listens
    target.transport.hosts.append(ghost)

    def probe(host):  # type: ignore[no-untyped-def]
        with open_transport(target, host) as t:
            return t.probe()["arch"]

    out = for_each_host(target, probe)
    assert out["testdev"] == target.arch  # one dead device does not stop the others
    assert isinstance(out["ghost"], DeviceError) and "connection refused" in str(out["ghost"])

    running, peak, lock = [0], [0], threading.Lock()

    def busy(host):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return host.name

    target.transport.hosts += [ghost.model_copy(update={"name": f"h{i}"}) for i in range(4)]
    target.transport.parallel = 2
    assert len(for_each_host(target, busy)) == 6 and peak[0] == 2


def test_upload_killed_mid_transfer_keeps_current_and_resumes(ssh_target: Callable[..., TargetSpec],
                                                              tmp_path: Path) -> None:
    target = ssh_target()
    root = Path(target.transport.root)
    with open_transport(target) as t:
        t.deploy(make_release(tmp_path / "A", "A"), "A")
    big = make_release(tmp_path / "B", "B", 24 * MiB)
    killed = threading.Event()
    with open_transport(target) as t:

        def kill_midway(rel: str, done: int, total: int) -> None:
            if rel == "data/blob.bin" and done > 8 * MiB and not killed.is_set():
                killed.set()
                threading.Thread(target=t.executor.abort).start()  # the link dies under the upload

        with pytest.raises(DeviceError, match="nothing was switched"):
            t.deploy(big, "B", progress=kill_midway)
    assert killed.is_set()
    assert (root / SPEC / "current").resolve() == root / SPEC / "releases" / "A"
    assert not (root / SPEC / "releases" / "B").exists()
    with open_transport(target) as t:
        again = t.deploy(big, "B")
    assert again["changed"] and (root / SPEC / "current").resolve() == root / SPEC / "releases" / "B"
    # Resumed: files that arrived are skipped, the blob continues from where it stopped.
    assert again["resumed_files"] + again["uploaded_files"] >= 1
    assert again["bytes_moved"] < again["release_bytes"] - 4 * MiB


def test_corrupted_upload_refused_by_on_device_hash(ssh_target: Callable[..., TargetSpec], tmp_path: Path) -> None:
    target = ssh_target()
    root = Path(target.transport.root)
    with open_transport(target) as t:
        t.deploy(make_release(tmp_path / "A", "A"), "A")
        before = snapshot(root / SPEC / "releases" / "A")
        rel = make_release(tmp_path / "B", "B", 512 * 1024)

        # Fault injection: a bit flips in a staged file after the upload and before the check
        # (a flaky SD card or a broken link cannot be produced on demand).
        def flip(staging: str) -> None:
            blob = Path(staging) / "data" / "blob.bin"
            data = bytearray(blob.read_bytes())
            data[1000] ^= 0x01
            blob.write_bytes(bytes(data))

        t.hooks.before_verify = flip
        with pytest.raises(DeviceError, match=r"on-device sha256 check refused release B \(data/blob.bin differ\)"):
            t.deploy(rel, "B")
        assert t.current() == "A" and t.releases() == ["A"]
        assert snapshot(root / SPEC / "releases" / "A") == before
        t.hooks.before_verify = None
        again = t.deploy(rel, "B")
        assert again["changed"] and t.current() == "B"
        assert again["uploaded_files"] == 1  # only the discarded file is sent again


@pytest.fixture
def small_releases_disk(tmp_path: Path) -> Path:
    """A device root (claimed already) whose releases/ of the spec is a 3 MiB tmpfs (like a nearly full SD card)."""
    root = tmp_path / "small-device"
    (root / SPEC / "releases").mkdir(parents=True)
    (root / ".edgeship-root").write_text("claimed")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(root / SPEC / "releases")],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield root
    subprocess.run(["umount", "-l", str(root / SPEC / "releases")], check=True)


def test_disk_too_small_is_a_clean_error(ssh_target: Callable[..., TargetSpec], small_releases_disk: Path,
                                         tmp_path: Path) -> None:
    target = ssh_target(root=small_releases_disk)
    with open_transport(target) as t:
        t.deploy(make_release(tmp_path / "A", "A", 1 * MiB), "A")
        before = snapshot(small_releases_disk / SPEC / "releases" / "A")
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"needs 4\.\d MiB more under .* but only \d\.\d MiB is free; "
                                              r"nothing was changed \(current: A\)"):
            t.deploy(make_release(tmp_path / "B", "B", 4 * MiB), "B")
        assert time.monotonic() - t0 < 10
        assert t.current() == "A" and t.releases() == ["A"]
        assert snapshot(small_releases_disk / SPEC / "releases" / "A") == before
        # releases/ is its own filesystem here, so staging moved next to it (atomic rename).
        assert (small_releases_disk / SPEC / "releases" / ".staging").is_dir()
        assert t.deploy(make_release(tmp_path / "C", "C", 512 * 1024), "C")["changed"]


def test_two_concurrent_deploys_are_serialized(ssh_target: Callable[..., TargetSpec], tmp_path: Path) -> None:
    target = ssh_target()
    rels = {rid: make_release(tmp_path / rid, rid, 3 * MiB) for rid in ("A", "B")}
    # A holder makes a short-waiting deploy fail clearly, naming who holds the lock.
    with open_transport(target) as holder, open_transport(target, lock_wait_s=1) as other:
        with holder.lock(wait_s=5):
            with pytest.raises(DeviceError, match=r"testdev \(127\.0\.0\.5:\d+\) is busy: .*@.* pid \d+"):
                other.deploy(rels["A"], "A")

    # Two deploys at once: one proceeds, the other waits for the lock, then proceeds.
    spans: dict[str, tuple[float, float]] = {}
    errors: list[BaseException] = []

    def deploy(rid: str) -> None:
        try:
            with open_transport(target, lock_wait_s=60) as t, t.lock(wait_s=60):
                start = time.monotonic()
                t.deploy(rels[rid], rid)
                spans[rid] = (start, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(rid,)) for rid in rels]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    (s1, e1), (s2, e2) = sorted(spans.values())
    assert e1 <= s2, "the two deploys overlapped under the lock"


def test_dead_holder_lock_taken_over_and_lost_lock_aborts_switch(ssh_target: Callable[..., TargetSpec],
                                                                 tmp_path: Path) -> None:
    target = ssh_target()
    rel_a, rel_b = make_release(tmp_path / "A", "A"), make_release(tmp_path / "B", "B", 2 * MiB)
    # The deploying host vanishes while holding the lock: its connection drops, the holder on the
    # device reads EOF and exits, the kernel releases the flock; the next deploy goes ahead.
    dying = open_transport(target)
    with dying.lock(wait_s=5):
        dying.executor.abort()
        with open_transport(target, lock_wait_s=10) as t:
            t0 = time.monotonic()
            assert t.deploy(rel_a, "A")["changed"]
            assert time.monotonic() - t0 < 10
    dying.close()

    # The holder dies mid-deploy (killed on the device): the deploy notices before switching.
    with open_transport(target) as t, t.lock(wait_s=5) as lk:
        def kill_holder(rel: str, done: int, total: int) -> None:
            if lk.device_pid is not None:
                os.kill(lk.device_pid, signal.SIGKILL)  # the test sshd's "device" is this machine
                lk.device_pid = None
                time.sleep(0.5)  # let sshd report the exit

        with pytest.raises(DeviceError, match="lost the deploy lock.*nothing was switched"):
            t.deploy(rel_b, "B", progress=kill_holder)
    with open_transport(target) as t:
        assert t.current() == "A"
