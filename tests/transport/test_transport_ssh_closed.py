"""A peer that hangs up is not a timeout (issue 11 #19): real OpenSSH refusing beyond MaxStartups."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import open_transport
from tests.transport import sshd as sshd_mod

pytestmark = pytest.mark.device


@pytest.fixture
def strict_sshd(sshd: sshd_mod.Sshd, tmp_path: Path) -> Iterator[int]:
    """A second real sshd (the fixture's config, own port) that allows one unauthenticated connection."""
    port = sshd_mod._free_port()
    config = (sshd.dir / "sshd_config").read_text()
    config = re.sub(r"(?m)^Port .*$", f"Port {port}", config)
    config = re.sub(r"(?m)^MaxStartups .*$", "MaxStartups 1", config)
    config = re.sub(r"(?m)^PidFile .*$", f"PidFile {tmp_path}/strict.pid", config)
    (tmp_path / "strict_config").write_text(config)
    proc = subprocess.Popen([sshd_mod.SSHD, "-D", "-E", str(tmp_path / "strict.log"), "-f",
                             str(tmp_path / "strict_config")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((sshd_mod.ADDRESS, port), timeout=1) as probe:
                    probe.recv(64)  # the banner: it is serving
                # sshd frees this probe's one pre-auth slot only when its child has exited; the
                # test's first connection came too soon once in a full-suite run and was refused.
                time.sleep(0.5)
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_peer_closing_the_connection_is_not_reported_as_a_timeout(strict_sshd: int, sshd: sshd_mod.Sshd,
                                                                   ssh_target: Callable[..., TargetSpec]) -> None:
    from pipeline.transport import hostkeys

    target = ssh_target(trusted=False, connect_timeout_s=15)
    target.transport.hosts[0].port = strict_sshd
    hostkeys.enrol_public_key(target, target.transport.hosts[0], sshd.host_key_line)  # same host key file
    with open_transport(target) as t:  # the server works when its one slot is free
        assert t.probe()["arch"]
    time.sleep(0.5)
    # Someone holds the one unauthenticated slot (a scanner, a stuck client): sshd hangs up on us.
    with socket.create_connection((sshd_mod.ADDRESS, strict_sshd), timeout=5) as squatter:
        squatter.recv(64)
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            open_transport(target)
        took = time.monotonic() - t0
    assert took < 5
    msg = str(err.value)
    assert "no SSH answer within 15 s" not in msg and "timeout" not in msg.lower(), msg
    assert re.search(r"closed the connection during the SSH handshake \(after \d+\.\d s\); is sshd overloaded "
                     r"\(MaxStartups\) or restarting", msg), msg


def test_silent_peer_is_still_a_timeout(ssh_target: Callable[..., TargetSpec]) -> None:
    """A listener that accepts and never speaks: the deadline message, after the deadline."""
    with socket.socket() as srv:
        srv.bind((sshd_mod.ADDRESS, 0))
        srv.listen(1)
        target = ssh_target(connect_timeout_s=1.5)
        target.transport.hosts[0].port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"no SSH answer within 1.5 s; is the device up"):
            open_transport(target)
        assert time.monotonic() - t0 >= 1.4
