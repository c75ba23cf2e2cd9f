"""Build and cache a device rootfs: debootstrap, CA/DNS/pip config, the runtime venv, host keys.

A rootfs is built in ``rootfs.building-<pid>`` next to its final place and renamed into place
only when complete, with a stamp recording the recipe fingerprint. An interrupted build
therefore leaves only a ``rootfs.building-*`` folder, which the next build unmounts and deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from pipeline.sim import host
from pipeline.sim._proc import CHROOT_ENV, kill_root, mounts_under, run, unmount_all
from pipeline.sim.config import (
    DEBIAN_SUITE,
    DEBOOTSTRAP_INCLUDE,
    DEBOOTSTRAP_VARIANT,
    DEVICE_RELEASES,
    DEVICE_VENV,
    RUNTIME_PINS,
    STAMP_FILE,
    SimSpec,
    device_dir,
    inside,
    recipe_fingerprint,
    rootfs_path,
)
from pipeline.sim.errors import RegistryUnreachable, SimBuildError, SimError

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Output fragments that mean "the network/registry was not reachable", not "the recipe is wrong".
_NETWORK_SIGNS = re.compile(
    r"Failed getting release file|Couldn't download|Temporary failure resolving|"
    r"NewConnectionError|ProxyError|SSLError|ConnectTimeout|ReadTimeout|Max retries exceeded|"
    r"Network is unreachable|Connection refused|No matching distribution found",
    re.IGNORECASE,
)
DEBOOTSTRAP_TIMEOUT = 1500.0
PIP_TIMEOUT = 1500.0


def read_stamp(root: Path) -> dict[str, object] | None:
    """The build stamp of ``root``, or None if absent/unreadable (i.e. not a finished build)."""
    try:
        data = json.loads(inside(root, STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(spec: SimSpec) -> bool:
    """True when the cached rootfs exists and was built from the current recipe."""
    stamp = read_stamp(rootfs_path(spec.name))
    return stamp is not None and stamp.get("recipe") == recipe_fingerprint(spec)


def safe_remove(path: Path) -> None:
    """Delete a (possibly half-built) rootfs, unmounting anything inside first.

    Deleting through a live bind mount of /dev or /proc would wreck the host, so this refuses
    to delete while anything below ``path`` is still mounted.
    """
    if not path.exists():
        return
    kill_root(path)  # e.g. a pip left running in a build's chroot by a killed edgeship
    unmount_all(path)
    if mounts_under(path):
        raise SimError(f"refusing to delete {path}: something below it is still mounted")
    shutil.rmtree(path)


def _chroot(root: Path, *args: str, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    """Run ``args`` inside ``root``; raise RegistryUnreachable when the output shows a network failure."""
    res = run(["chroot", str(root), *args], timeout=timeout, env=env or CHROOT_ENV, check=False, what=what)
    if res.returncode != 0:
        _raise_build_error(what, res.stdout)
    return res.stdout


def _raise_build_error(what: str, output: str) -> None:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    tail = lines[-1] if lines else "(no output)"
    if _NETWORK_SIGNS.search(output):
        raise RegistryUnreachable(f"{what}: registry or mirror unreachable: {tail}")
    raise SimBuildError(f"{what} failed: {tail}")


def _debootstrap(spec: SimSpec, tmp: Path) -> None:
    mirror = host.debian_mirror()
    cmd = [
        "debootstrap", f"--arch={spec.debian_arch}", f"--variant={DEBOOTSTRAP_VARIANT}",
        f"--include={','.join(DEBOOTSTRAP_INCLUDE)}", DEBIAN_SUITE, str(tmp), mirror,
    ]
    res = run(cmd, timeout=DEBOOTSTRAP_TIMEOUT, check=False, what="debootstrap",
              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if res.returncode != 0:
        log = tmp / "debootstrap" / "debootstrap.log"
        detail = res.stdout + (log.read_text(errors="replace") if log.exists() else "")
        _raise_build_error(f"debootstrap {spec.debian_arch}", detail)


def _copy_host_config(tmp: Path) -> None:
    """CA bundle, DNS and pip config, so pip inside reaches the registry the way the host does."""
    ca = inside(tmp, str(CA_BUNDLE))
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CA_BUNDLE, ca)
    resolv = inside(tmp, "/etc/resolv.conf")
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    # Copy the content, not a symlink: the host's target (e.g. /run/...) is absent in the chroot.
    resolv.write_text(Path("/etc/resolv.conf").read_text())
    for dest, src in host.host_pip_configs().items():
        target = inside(tmp, dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(host.filtered_pip_config(src.read_text(), tmp))


def mount_api_fs(root: Path) -> None:
    """Mount /proc, /dev and /dev/pts into ``root`` (idempotent). Never /sys: see below.

    /sys stays unmounted on purpose: with it, onnxruntime's cpuinfo reads the x86 host's CPU
    topology and segfaults under aarch64 emulation.
    """
    mounted = set(mounts_under(root))
    steps = [
        (inside(root, "/proc"), ["mount", "-t", "proc", "proc"]),
        (inside(root, "/dev"), ["mount", "--bind", "/dev"]),
        (inside(root, "/dev/pts"), ["mount", "--bind", "/dev/pts"]),
    ]
    for point, cmd in steps:
        point.mkdir(parents=True, exist_ok=True)
        if Path(os.path.realpath(point)) in mounted:
            continue
        run([*cmd, str(point)], timeout=30, what=f"mount {point}")
        if "--bind" in cmd:
            # On hosts where / is a shared mount (systemd), a bind of /dev joins /dev's peer
            # group: mounting or unmounting below it would then propagate to the host's /dev.
            run(["mount", "--make-rslave", str(point)], timeout=30, what=f"mount --make-rslave {point}")


def _install_runtime(tmp: Path) -> None:
    env = dict(CHROOT_ENV, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_CERT=str(CA_BUNDLE), SSL_CERT_FILE=str(CA_BUNDLE))
    _chroot(tmp, "python3", "-m", "venv", DEVICE_VENV, timeout=600, what="python3 -m venv")
    # Wheels only: building any of these from source under emulation would take hours.
    _chroot(tmp, f"{DEVICE_VENV}/bin/pip", "install", "--no-cache-dir", "--only-binary=:all:",
            *RUNTIME_PINS, timeout=PIP_TIMEOUT, what="pip install runtimes", env=env)


def _keep_host_keys(old: Path, new: Path) -> None:
    """Carry the previous rootfs's sshd host keys over, so a rebuild does not force re-trust."""
    old_keys = sorted(inside(old, "/etc/ssh").glob("ssh_host_*_key*")) if old.exists() else []
    for key in old_keys:
        shutil.copy2(key, inside(new, f"/etc/ssh/{key.name}"))


def build(spec: SimSpec) -> Path:
    """Build ``spec``'s rootfs from scratch and atomically put it in place. Caller holds the lock.

    Returns:
        The final rootfs path.

    Raises:
        RegistryUnreachable: The mirror or package registry could not be reached.
        SimBuildError: Any other build step failed.
    """
    ddir = device_dir(spec.name)
    ddir.mkdir(parents=True, exist_ok=True)
    for stale in ddir.glob("rootfs.building-*"):
        safe_remove(stale)  # left by an interrupted build; never renamed, so never "done"
    for stale in ddir.glob("rootfs.old-*"):
        safe_remove(stale)
    tmp = ddir / f"rootfs.building-{os.getpid()}"
    started = time.monotonic()
    try:
        _debootstrap(spec, tmp)
        _copy_host_config(tmp)
        mount_api_fs(tmp)
        _install_runtime(tmp)
        _chroot(tmp, "ssh-keygen", "-A", timeout=300, what="ssh-keygen -A")
        inside(tmp, DEVICE_RELEASES).mkdir(parents=True, exist_ok=True)
        _keep_host_keys(rootfs_path(spec.name), tmp)
        unmount_all(tmp)
        stamp = {
            "name": spec.name,
            "recipe": recipe_fingerprint(spec),
            "arch": spec.debian_arch,
            "pins": list(RUNTIME_PINS),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        inside(tmp, STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        final = rootfs_path(spec.name)
        if final.exists():
            old = ddir / f"rootfs.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            safe_remove(old)
        else:
            tmp.rename(final)
        return final
    finally:
        if tmp.exists():
            safe_remove(tmp)
