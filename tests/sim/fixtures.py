"""Session fixtures for the emulated devices; other test folders reuse them.

Use from another folder's tests by registering this module as a plugin in the ROOT conftest
(``pytest_plugins = ["tests.sim.fixtures"]``), then ask for ``sim_devices``::

    @pytest.mark.device
    def test_deploy(sim_devices, tmp_path):
        info = sim_devices["sim-arm64"]            # pipeline.sim.DeviceInfo
        known_hosts = enroll_known_hosts(tmp_path / "known_hosts", info)

``sim_devices`` brings both devices up once per session (building the cached rootfs on first
use) and stops, at the end, only those it started. It skips with the reason when not root,
when host tools are missing, or when a build cannot reach the package registry / mirror.
Set ``EDGESHIP_SIM_INSTALL_DEPS=1`` to let it apt-get install missing host tools.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import sim

SIM_NAMES = ("sim-arm64", "sim-x86")


def enroll_known_hosts(path: Path, *infos: sim.DeviceInfo) -> Path:
    """Write an OpenSSH known_hosts at ``path`` holding exactly the given devices' host keys.

    The key comes from the device's rootfs (``sim.host_public_key``), never from the network,
    so a client using it with RejectPolicy / StrictHostKeyChecking really verifies the host.
    """
    lines = [f"[{info.host}]:{info.port} {sim.host_public_key(info.name)}" for info in infos]
    path.write_text("\n".join(lines) + "\n")
    return path


def ssh_client(info: sim.DeviceInfo, known_hosts: Path, timeout: float = 20.0) -> Any:
    """A connected paramiko client to ``info`` that only accepts hosts in ``known_hosts``."""
    paramiko = pytest.importorskip("paramiko")
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(info.host, port=info.port, username=info.user, key_filename=info.key_file,
                   timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                   look_for_keys=False, allow_agent=False)
    return client


def run_remote(client: Any, command: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``command`` over ``client``; return (exit status, stdout, stderr), bounded by ``timeout``."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


@pytest.fixture(scope="session")
def sim_devices() -> Iterator[dict[str, sim.DeviceInfo]]:
    """Both emulated devices up for the whole session: ``{name: DeviceInfo}``."""
    if os.geteuid() != 0:
        pytest.skip("emulated devices need root (debootstrap, chroot, mount)")
    install = os.environ.get("EDGESHIP_SIM_INSTALL_DEPS") == "1"
    started: list[str] = []
    infos: dict[str, sim.DeviceInfo] = {}
    try:
        for name in SIM_NAMES:
            was_up = sim.status(name, probe=False)["state"] in ("up", "frozen")
            infos[name] = sim.up(name, install_deps=install)
            if not was_up:
                started.append(name)
    except sim.SimPrerequisiteError as err:
        pytest.skip(f"emulated devices unavailable: {err}")
    except sim.RegistryUnreachable as err:
        pytest.skip(f"cannot build emulated device rootfs (registry unreachable): {err}")
    try:
        yield infos
    finally:
        for name in started:
            sim.down(name)
