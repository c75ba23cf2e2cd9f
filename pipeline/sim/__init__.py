"""Emulated edge devices: Debian rootfs under QEMU user emulation with a real, chrooted sshd.

``sim-arm64`` (aarch64, 127.0.0.2:2222) and ``sim-x86`` (x86_64, 127.0.0.3:2223) are what the
deploy tests ship to, and what users without hardware deploy to. Each has the device agent's
runtime env at ``/opt/edgeship/venv`` (numpy, onnxruntime, ai-edge-litert, ncnn). Needs root.

    >>> from pipeline import sim
    >>> info = sim.up("sim-arm64")          # builds once (~5 min), then starts in seconds
    >>> info.host, info.port, info.key_file
    >>> sim.status("sim-arm64")["arch"]     # 'aarch64', via uname -m over SSH
    >>> sim.down("sim-arm64")

Host keys are never auto-accepted: ``host_public_key(name)`` / ``DeviceInfo.host_key_fingerprint``
are for explicit enrolment. Faults for deploy tests: ``set_releases_quota`` (disk full) and
``freeze``/``thaw`` (a hanging device). Importing this package is cheap (no paramiko, no
onnxruntime); paramiko is imported only to probe a device over SSH.
"""

from __future__ import annotations

from pipeline.sim.device import (
    DeviceInfo,
    device_file,
    device_info,
    down,
    freeze,
    host_public_key,
    known_devices,
    set_releases_quota,
    status,
    thaw,
    up,
)
from pipeline.sim.errors import RegistryUnreachable, SimBuildError, SimError, SimPrerequisiteError

__all__ = [
    "DeviceInfo",
    "RegistryUnreachable",
    "SimBuildError",
    "SimError",
    "SimPrerequisiteError",
    "device_file",
    "device_info",
    "down",
    "freeze",
    "host_public_key",
    "known_devices",
    "set_releases_quota",
    "status",
    "thaw",
    "up",
]
