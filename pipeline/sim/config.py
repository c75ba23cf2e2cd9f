"""What the emulated devices are: names, addresses, architectures, the rootfs recipe and paths.

Everything here is data; nothing touches the system. The recipe fingerprint covers only what is
baked into a rootfs (Debian suite, packages, Python pins); things written at every ``up`` (sshd
drop-in config, authorized_keys) are not part of it, so changing them never forces a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Bump when the build steps change in a way the fields below do not capture.
RECIPE_VERSION = 1

DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_VARIANT = "minbase"
#: ``faketime`` (libfaketime) lets tests run the device agent with a clock a year off, to show
#: that no release decision depends on the device's time.
DEBOOTSTRAP_INCLUDE = ("python3", "python3-venv", "python3-pip", "openssh-server", "faketime")

#: The device agent's runtimes. All four have cp311 manylinux aarch64 and x86_64 wheels
#: (bookworm ships Python 3.11, glibc 2.36); ai-edge-litert 2.3.0's is tagged manylinux_2_27.
RUNTIME_PINS = (
    "numpy==2.4.6",
    "onnxruntime==1.32.0",
    "ai-edge-litert==2.3.0",
    "ncnn==1.0.20261020",
)

#: Paths inside the device (the chroot).
DEVICE_ROOT = "/opt/edgeship"
DEVICE_VENV = f"{DEVICE_ROOT}/venv"
DEVICE_PYTHON = f"{DEVICE_VENV}/bin/python"
DEVICE_RELEASES = f"{DEVICE_ROOT}/releases"
DEVICE_USER = "root"
SSHD_PIDFILE = "/run/edgeship-sshd.pid"
SSHD_LOGFILE = "/var/log/edgeship-sshd.log"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/edgeship.conf"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
STAMP_FILE = "/etc/edgeship-sim.json"

INSTALL_HINT = "apt-get install -y qemu-user-static binfmt-support debootstrap openssh-server"


@dataclass(frozen=True)
class SimSpec:
    """One emulated device.

    Attributes:
        name: Device name used on the command line and in paths.
        debian_arch: Debian architecture passed to ``debootstrap --arch``.
        uname: What ``uname -m`` answers on the device.
        address: Loopback address sshd listens on (each device gets its own).
        port: TCP port sshd listens on.
        qemu: Name of the qemu user-mode binfmt entry needed when the host differs, else None.
        qemu_cpu: The CPU model qemu emulates (``QEMU_CPU``), that of the board the device
            imitates. qemu's default ``max`` CPU offers every extension (dot product, i8mm, SVE);
            kernels chosen for those run through slow helpers under emulation, so ONNX Runtime's
            int8 MobileNetV2 ran 7x slower than fp32 there and 1.9x faster as a Cortex-A72.
    """

    name: str
    debian_arch: str
    uname: str
    address: str
    port: int
    qemu: str | None
    qemu_cpu: str | None = None


SPECS: dict[str, SimSpec] = {
    "sim-arm64": SimSpec("sim-arm64", "arm64", "aarch64", "127.0.0.2", 2222, "qemu-aarch64", "cortex-a72"),
    "sim-x86": SimSpec("sim-x86", "amd64", "x86_64", "127.0.0.3", 2223, "qemu-x86_64"),
}


def recipe_fingerprint(spec: SimSpec) -> str:
    """Hash of everything baked into ``spec``'s rootfs; a different value means rebuild."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": DEBIAN_SUITE,
        "variant": DEBOOTSTRAP_VARIANT,
        "include": list(DEBOOTSTRAP_INCLUDE),
        "arch": spec.debian_arch,
        "pins": list(RUNTIME_PINS),
        "venv": DEVICE_VENV,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def edgeship_home() -> Path:
    """``$EDGESHIP_HOME`` or ``~/.edgeship``."""
    env = os.environ.get("EDGESHIP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".edgeship"


def sim_home() -> Path:
    """Folder holding the client key and one folder per device."""
    return edgeship_home() / "sim"


def device_dir(name: str) -> Path:
    """Per-device folder: rootfs, device.json, lock file."""
    return sim_home() / name


def rootfs_path(name: str) -> Path:
    """The finished, cached rootfs of ``name`` (only ever created by an atomic rename)."""
    return device_dir(name) / "rootfs"


def client_key_path() -> Path:
    """Private half of the edgeship-owned client key that every sim device trusts."""
    return sim_home() / "id_ed25519"


def inside(root: Path, device_path: str) -> Path:
    """Host path of ``device_path`` inside the chroot ``root``."""
    return root / device_path.lstrip("/")
