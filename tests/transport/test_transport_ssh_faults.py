"""Host-key refusal before authentication, enrolment, and frozen devices (deadlines, no hangs)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import hostkeys, open_transport, trust
from tests.transport.helpers import make_release, snapshot
from tests.transport.sshd import Sshd

pytestmark = pytest.mark.device


def _other_key_line(tmp_path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "mitm")], check=True)
    return (tmp_path / "mitm.pub").read_text()


def test_unknown_and_changed_host_keys_refused_before_auth(sshd: Sshd, ssh_target: Callable[..., TargetSpec],
                                                           tmp_path: Path) -> None:
    target = ssh_target()
    root = Path(target.transport.root)
    with open_transport(target) as t:
        t.deploy(make_release(tmp_path / "A", "A"), "A")
    before, auths = snapshot(root), sshd.userauth_requests()

    unknown = ssh_target(trusted=False, known_hosts=tmp_path / "empty_known_hosts")
    with pytest.raises(DeviceError) as err:
        open_transport(unknown)
    assert str(err.value) == (f"host key of 127.0.0.5:{sshd.port} is not trusted; run `edgeship devices trust "
                              "test-ssh` to check and enrol its fingerprint")

    # known_hosts holds another key for this host: what a man-in-the-middle looks like.
    hostkeys.enrol_public_key(target, target.transport.hosts[0], _other_key_line(tmp_path))
    with pytest.raises(DeviceError, match=r"host key of 127\.0\.0\.5:\d+ CHANGED to SHA256:\S+ .*possible "
                                          r"man-in-the-middle.*edgeship devices trust test-ssh --fingerprint SHA256:"):
        open_transport(target)

    time.sleep(0.5)  # let sshd flush its log
    assert sshd.userauth_requests() == auths, "the client must stop before any authentication request"
    assert snapshot(root) == before, "nothing on the device may change"
    # ~/.ssh/known_hosts or AutoAdd never came into play: our file still holds only the other key.
    assert len(Path(target.transport.known_hosts).read_text().splitlines()) == 1


def test_trust_requires_confirmation_and_refuses_silent_replacement(sshd: Sshd, ssh_target: Callable[..., TargetSpec],
                                                                     tmp_path: Path) -> None:
    target = ssh_target(trusted=False)
    host = target.transport.hosts[0]
    known = Path(target.transport.known_hosts)
    real_fp = hostkeys.fingerprint(hostkeys.key_from_line(sshd.host_key_line))
    auths = sshd.userauth_requests()

    with pytest.raises(DeviceError, match=rf"presents {re.escape(real_fp)}; not trusted without confirmation"):
        trust(target, host)
    with pytest.raises(DeviceError, match="not the expected SHA256:AAAA"):
        trust(target, host, expected="SHA256:AAAA")
    assert not known.exists()
    assert trust(target, host, expected=real_fp)["status"] == "enrolled"
    assert trust(target, host, yes=True)["status"] == "already-trusted"
    with open_transport(target) as t:
        assert t.probe()["arch"]

    hostkeys.enrol_public_key(target, host, _other_key_line(tmp_path))
    with pytest.raises(DeviceError, match=rf"CHANGED \(now {re.escape(real_fp)}.*--fingerprint {re.escape(real_fp)}"):
        trust(target, host, yes=True)  # --yes alone never replaces a changed key
    assert trust(target, host, expected=real_fp)["status"] == "replaced"
    assert len(known.read_text().splitlines()) == 1
    # Enrolment is a key exchange only: the one authentication is the probe's connection.
    time.sleep(0.3)
    assert sshd.userauth_requests() - auths <= 2


def test_frozen_device_fails_within_deadlines(sshd: Sshd, ssh_target: Callable[..., TargetSpec],
                                              tmp_path: Path) -> None:
    target = ssh_target(connect_timeout_s=2, command_timeout_s=3, transfer_timeout_s=3, keepalive_s=1)
    rel = make_release(tmp_path / "A", "A", 64 * 1024)
    big = make_release(tmp_path / "B", "B", 40 << 20)

    # 1. A device that stops answering between commands (no channel opens), then one that
    #    freezes while the agent runs (the command deadline fires).
    with open_transport(target) as t:
        t.deploy(rel, "A")
        frozen = sshd.session_pids()
        sshd.freeze(frozen)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"agent probe did not finish within 2 s and the device stopped"):
                t.run_agent(["probe"], timeout_s=2)
            assert time.monotonic() - t0 < 2 + 2
        finally:
            sshd.thaw(frozen)
    with open_transport(target, lock_wait_s=600) as t:  # a long lock wait must not mean a long hang
        frozen = sshd.session_pids()
        sshd.freeze(frozen)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"did not answer within 2 s .*frozen"):
                t.deploy(rel, "A")
            assert time.monotonic() - t0 < 2 + 2
        finally:
            sshd.thaw(frozen)
    # An agent that takes 3 s (a stand-in for a long validation), so the freeze lands mid-command.
    sleepy = make_release(tmp_path / "S", "S", 1024, extra={"edgeship_agent/__main__.py": (
        b"import json, time\ntime.sleep(3)\nprint(json.dumps({'ok': True}))\n")})
    with open_transport(target) as t:
        t.deploy(sleepy, "S")
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"did not finish within 1 s and was stopped"):
            t.run_agent(["run"], timeout_s=1)  # the device's own timeout(1) stops it
        assert time.monotonic() - t0 < 1 + 3
        assert t.run_agent(["run"], timeout_s=30) == {"ok": True}
        frozen = []
        timer = threading.Timer(1.0, lambda: (frozen.extend(sshd.session_pids()), sshd.freeze(frozen)))
        t0 = time.monotonic()
        timer.start()
        try:
            with pytest.raises(DeviceError, match=r"agent run did not finish within 2 s and the device stopped"):
                t.run_agent(["run"], timeout_s=2)
            print("frozen mid-command", time.monotonic() - t0)
            assert time.monotonic() - t0 < 2 + 5 + 2
        finally:
            timer.join()
            sshd.thaw(frozen)

    # 2. An upload to a device that freezes after the first bytes: the transfer watchdog fires.
    with open_transport(target) as t:
        state = {"frozen": []}

        def freeze_once(rel_path: str, done: int, total: int) -> None:
            if rel_path == "data/blob.bin" and not state["frozen"]:
                state["frozen"] = sshd.session_pids()
                sshd.freeze(state["frozen"])

        t0 = time.monotonic()
        try:
            with pytest.raises(DeviceError, match=r"did not finish within 3 s \(transfer_timeout_s\)"):
                t.deploy(big, "B", progress=freeze_once)
            elapsed = time.monotonic() - t0
        finally:
            sshd.thaw(state["frozen"])
        print("frozen upload", elapsed)
        assert elapsed < 3 + 5, elapsed

    # 3. A device frozen before we connect: TCP is accepted by the kernel, no SSH banner comes.
    sshd.freeze([sshd.proc.pid])
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"no SSH answer within 2 s|SSH connection failed"):
            open_transport(target)
        print("frozen listener", time.monotonic() - t0)
        assert time.monotonic() - t0 < 2 + 3
    finally:
        sshd.thaw([sshd.proc.pid])
    with open_transport(target) as t:
        assert t.current() == "S"  # nothing switched by the failed deploy of B
