"""Bring emulated devices up and down, describe them, and inject faults (disk quota, hang).

State lives on disk, not in this process: the rootfs, the sshd pidfile inside it, the mount
table and ``device.json``. Every call re-reads it, so separate CLI invocations (and pytest
sessions) see the same device. A per-device lock file serialises up/down/build.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.sim import host, rootfs, sshd
from pipeline.sim._proc import is_mounted, kill_root, run, unmount_all
from pipeline.sim.config import (
    DEVICE_PYTHON,
    DEVICE_RELEASES,
    DEVICE_ROOT,
    DEVICE_USER,
    SPECS,
    SimSpec,
    client_key_path,
    device_dir,
    inside,
    recipe_fingerprint,
    rootfs_path,
)
from pipeline.sim.errors import SimError

LOCK_TIMEOUT = 2700.0  # another process may be building a rootfs (minutes under emulation)


@dataclass(frozen=True)
class DeviceInfo:
    """How to reach a device; the content of ``$EDGESHIP_HOME/sim/<name>/device.json``."""

    name: str
    host: str
    port: int
    user: str
    key_file: str
    arch: str
    python: str
    root: str
    host_key_fingerprint: str

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def spec_for(name: str) -> SimSpec:
    """The spec of device ``name``.

    Raises:
        SimError: Unknown name (lists the known ones).
    """
    try:
        return SPECS[name]
    except KeyError:
        raise SimError(f"unknown sim device {name!r}; known: {', '.join(SPECS)}") from None


def device_file(name: str) -> Path:
    """Path of the device description file written by ``up``."""
    return device_dir(name) / "device.json"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    path = device_dir(name) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SimError(
                        f"{path} stayed locked for {LOCK_TIMEOUT:.0f}s (another edgeship sim running?)"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _info(spec: SimSpec) -> DeviceInfo:
    key_line = sshd.host_public_key_line(rootfs_path(spec.name))
    return DeviceInfo(
        name=spec.name, host=spec.address, port=spec.port, user=DEVICE_USER,
        key_file=str(client_key_path()), arch=spec.uname, python=DEVICE_PYTHON,
        root=DEVICE_ROOT, host_key_fingerprint=sshd.fingerprint(key_line),
    )


def up(name: str, install_deps: bool = False, rebuild: bool = False,
       releases_mb: int | None = None) -> DeviceInfo:
    """Build (once, cached) and start device ``name``; idempotent when it is already up.

    Args:
        name: ``sim-arm64`` or ``sim-x86``.
        install_deps: apt-get install missing host tools instead of failing.
        rebuild: Rebuild the rootfs even if the cached one is current.
        releases_mb: If set, mount a tmpfs of this size at /opt/edgeship/releases (disk-full
            fault); None leaves the current setting alone.

    Raises:
        SimPrerequisiteError: Not root / host tools missing.
        RegistryUnreachable: The build could not reach the Debian mirror or package registry.
        SimError: Anything else (message says what and how to fix).
    """
    spec = spec_for(name)
    host.preflight([spec], install_deps=install_deps)
    host.ensure_binfmt(spec)
    with _locked(name):
        root = rootfs_path(name)
        if rebuild or not rootfs.is_current(spec):
            _down_locked(spec)
            rootfs.build(spec)
        was_up = sshd.running_pid(root) is not None
        if was_up:
            sshd.thaw(root)  # `up` promises a usable device, even after an unpaired freeze()
        try:
            if sshd.configure(spec, root) and was_up:
                sshd.stop(root)  # a new drop-in (e.g. the emulated CPU) applies to new sessions only
            rootfs.mount_api_fs(root)
            if releases_mb is not None:
                _apply_quota(_quota_point(root, None), releases_mb)
            sshd.start(spec, root)
        except BaseException:
            if not was_up:
                _down_locked(spec)  # leave no mounts behind from a start that failed
            raise
        info = _info(spec)
        device_file(name).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        return info


def _down_locked(spec: SimSpec) -> None:
    root = rootfs_path(spec.name)
    if not root.exists():
        return
    sshd.stop(root)
    kill_root(root)  # sessions and commands still running inside the chroot
    for point in _quota_points(root):
        _apply_quota(point, None)  # keep deployed releases: copy them out of the tmpfs
    unmount_all(root)


def down(name: str) -> None:
    """Stop device ``name``: sshd and everything running in it, then unmount. Idempotent."""
    spec = spec_for(name)
    with _locked(name):
        _down_locked(spec)


def device_info(name: str) -> DeviceInfo:
    """The description ``up`` wrote for ``name``.

    Raises:
        SimError: The device was never brought up.
    """
    spec_for(name)
    path = device_file(name)
    try:
        return DeviceInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise SimError(f"no device description at {path}: run `edgeship sim up {name}`") from err


def host_public_key(name: str) -> str:
    """``ssh-ed25519 AAAA...`` host key line of ``name``, read from its rootfs (for enrolment)."""
    spec_for(name)
    return sshd.host_public_key_line(rootfs_path(name))


def _quota_point(root: Path, spec: str | None) -> Path:
    """The release folder a quota mounts over: one spec's slot (``<root>/<spec>/releases``, where
    a deploy of that spec writes) or, without a spec, the device root's own ``releases``."""
    return inside(root, f"{DEVICE_ROOT}/{spec}/releases" if spec else DEVICE_RELEASES)


def _quota_points(root: Path) -> list[Path]:
    """The release folders that carry a quota now (tmpfs mounts)."""
    candidates = [inside(root, DEVICE_RELEASES), *sorted(inside(root, DEVICE_ROOT).glob("*/releases"))]
    return [p for p in candidates if is_mounted(p)]


def _releases_mb(root: Path) -> int | None:
    points = _quota_points(root)
    return shutil.disk_usage(points[0]).total // (1024 * 1024) if points else None


def status(name: str, probe: bool = True) -> dict[str, object]:
    """State of ``name``: up/down/frozen/not built, address, arch, rootfs, host key fingerprint.

    When up and ``probe``, the arch is what ``uname -m`` answers over SSH (real round trip).
    """
    spec = spec_for(name)
    root = rootfs_path(name)
    stamp = rootfs.read_stamp(root)
    pid = sshd.running_pid(root) if root.exists() else None
    out: dict[str, object] = {
        "name": name, "address": spec.address, "port": spec.port, "rootfs": str(root),
        "built": stamp is not None,
        "recipe_current": stamp is not None and stamp.get("recipe") == recipe_fingerprint(spec),
        "pid": pid, "expected_arch": spec.uname, "arch": None,
        "host_key_fingerprint": None, "releases_quota_mb": None,
    }
    if stamp is not None:
        out["host_key_fingerprint"] = sshd.fingerprint(sshd.host_public_key_line(root))
    if pid is None:
        out["state"] = "down" if stamp is not None else "not built"
        return out
    out["releases_quota_mb"] = _releases_mb(root)
    if sshd.is_frozen(root):
        out["state"] = "frozen"  # probing would only time out
        return out
    out["state"] = "up"
    if probe:
        try:
            out["arch"] = sshd.ssh_command(spec, root, "uname -m", timeout=20)
        except SimError as err:
            out["state"] = "unreachable"
            out["error"] = str(err)
    return out


def known_devices() -> list[str]:
    """Names of every emulated device this module can build."""
    return list(SPECS)


# ---- faults -----------------------------------------------------------------------------

def _apply_quota(point: Path, megabytes: int | None) -> None:
    """(Re)mount the release folder ``point`` as a ``megabytes`` tmpfs, or back to the rootfs disk.

    Existing releases are carried over, so "release N installed, N+1 does not fit" can be staged.
    """
    point.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeship-releases-stash-") as tmp:
        stash = Path(tmp) / "r"
        shutil.copytree(point, stash, symlinks=True)
        if is_mounted(point):
            unmount_all(point)
        for entry in point.iterdir():  # what lies under the mount is older than the stash
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if megabytes is not None:
            if megabytes <= 0:
                raise SimError(f"releases quota must be a positive number of MB, got {megabytes}")
            run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(point)],
                timeout=30, what="mount releases tmpfs")
        try:
            shutil.copytree(stash, point, symlinks=True, dirs_exist_ok=True)
        except OSError as err:
            raise SimError(f"existing releases do not fit in {megabytes} MB: {err}") from err


def set_releases_quota(name: str, megabytes: int | None, spec: str | None = None) -> None:
    """Shrink the free disk of a running device's release area (fault injection).

    Mounts a tmpfs of ``megabytes`` MB at ``/opt/edgeship/<spec>/releases`` (the slot a deploy of
    ``spec`` writes to; ``/opt/edgeship/releases`` without a spec; existing releases are copied
    in), so a deploy that needs more fails with ENOSPC like a full SD card. ``None`` removes the
    quota and copies the releases back onto the rootfs. ``down`` also removes it.

    Raises:
        SimError: Device not up, or the existing releases do not fit.
    """
    spec_for(name)
    with _locked(name):
        root = rootfs_path(name)
        if sshd.running_pid(root) is None:
            raise SimError(f"{name} is not up: run `edgeship sim up {name}` first")
        _apply_quota(_quota_point(root, spec), megabytes)


def freeze(name: str, running: bool = True) -> list[int]:
    """Make device ``name`` hang, like a board that stopped answering (fault injection).

    Sends SIGSTOP to the listening sshd, so new connections are accepted by the kernel but
    never get an SSH banner (clients hit their banner/connect timeout), and, when ``running``,
    to every existing session and the commands they run, so in-flight commands stall too.
    Undo with ``thaw``; ``down`` also thaws.

    Returns:
        The pids stopped.
    """
    spec_for(name)
    return sshd.freeze(rootfs_path(name), running=running)


def thaw(name: str) -> list[int]:
    """Resume every process that ``freeze`` stopped (SIGCONT). Returns the pids continued."""
    spec_for(name)
    return sshd.thaw(rootfs_path(name))
