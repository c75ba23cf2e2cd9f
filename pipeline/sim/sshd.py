"""The device's OpenSSH server: client key, config, start/stop, host key, freeze/thaw, probe.

sshd runs from the rootfs (``chroot ROOT /usr/sbin/sshd``), so under user emulation it is the
device's own aarch64 binary. Its pidfile lives inside the rootfs; a pid is trusted only if that
process's root directory really is the rootfs (a stale pidfile or a recycled pid is ignored).
"""

from __future__ import annotations

import base64
import hashlib
import signal
import socket
import time
from pathlib import Path

from pipeline.sim._proc import CHROOT_ENV, children_of, pids_in_root, proc_state, run, signal_pids
from pipeline.sim.config import (
    DEVICE_USER,
    HOST_KEY,
    SSHD_DROPIN,
    SSHD_LOGFILE,
    SSHD_PIDFILE,
    SimSpec,
    client_key_path,
    inside,
)
from pipeline.sim.errors import SimError

START_TIMEOUT = 60.0  # sshd under qemu needs a few seconds to come up on a busy 2-core host

#: Written at every ``up`` (not baked in the rootfs). Only the ed25519 host key is offered, so
#: the fingerprint we publish is the one every client sees. Generous MaxStartups/MaxSessions
#: because deploy tests open many connections at once.
SSHD_CONFIG = f"""\
# Written by edgeship sim; overwritten at every `edgeship sim up`.
HostKey {HOST_KEY}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
MaxStartups 64:30:128
MaxSessions 64
"""


def sshd_config(spec: SimSpec) -> str:
    """The drop-in for ``spec``: the common settings, and the emulated CPU model for every session
    (qemu-user reads ``QEMU_CPU`` from the environment of each program it starts)."""
    return SSHD_CONFIG + (f"SetEnv QEMU_CPU={spec.qemu_cpu}\n" if spec.qemu_cpu else "")


def ensure_client_key() -> Path:
    """Create the edgeship-owned client key pair once (``$EDGESHIP_HOME/sim/id_ed25519``)."""
    key = client_key_path()
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    key.parent.mkdir(parents=True, exist_ok=True)
    for stale in (key, key.with_suffix(".pub")):
        stale.unlink(missing_ok=True)  # half a pair is useless; regenerate both
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeship-sim", "-f", str(key)],
        timeout=60, what="ssh-keygen (client key)")
    key.chmod(0o600)
    return key


def configure(spec: SimSpec, root: Path) -> bool:
    """Write the sshd drop-in and root's authorized_keys (the edgeship client key only).

    Returns:
        Whether the drop-in changed (a running sshd must restart to apply it).
    """
    pub = ensure_client_key().with_suffix(".pub").read_text().strip()
    dropin = inside(root, SSHD_DROPIN)
    dropin.parent.mkdir(parents=True, exist_ok=True)
    text = sshd_config(spec)
    changed = not dropin.exists() or dropin.read_text() != text
    dropin.write_text(text)
    ssh_dir = inside(root, f"/{DEVICE_USER}/.ssh")
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(pub + "\n")
    auth.chmod(0o600)
    # Privilege-separation directory sshd insists on; /run is a plain folder in the rootfs.
    inside(root, "/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    return changed


def host_public_key_line(root: Path) -> str:
    """``ssh-ed25519 AAAA...`` of the device's host key (no comment), read from the rootfs."""
    path = inside(root, HOST_KEY + ".pub")
    try:
        kind, blob = path.read_text().split()[:2]
    except (OSError, ValueError) as err:
        raise SimError(f"no host key at {path}: build the device first (edgeship sim up)") from err
    return f"{kind} {blob}"


def fingerprint(public_key_line: str) -> str:
    """``SHA256:...`` fingerprint, the form ``ssh-keygen -lf`` prints."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def running_pid(root: Path) -> int | None:
    """Pid of the device's listening sshd, or None when it is not running."""
    try:
        pid = int(inside(root, SSHD_PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid in pids_in_root(root) else None


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def start(spec: SimSpec, root: Path) -> int:
    """Start sshd chrooted in ``root`` on ``spec.address:spec.port``; return its pid.

    Raises:
        SimError: The port is taken, the config is invalid, or sshd does not listen in time.
    """
    pid = running_pid(root)
    if pid is not None:
        return pid
    if _port_open(spec.address, spec.port):
        raise SimError(f"{spec.address}:{spec.port} is already in use by another process; stop it first")
    base = ["chroot", str(root), "/usr/sbin/sshd", "-p", str(spec.port),
            "-o", f"ListenAddress={spec.address}", "-o", f"PidFile={SSHD_PIDFILE}"]
    run([*base, "-t"], timeout=60, env=CHROOT_ENV, what=f"sshd -t ({spec.name})")
    inside(root, SSHD_PIDFILE).unlink(missing_ok=True)
    # sshd daemonizes: this returns once the listener has forked into the background.
    run([*base, "-E", SSHD_LOGFILE], timeout=60, env=CHROOT_ENV, what=f"sshd ({spec.name})")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = running_pid(root)
        if pid is not None and _port_open(spec.address, spec.port):
            return pid
        time.sleep(0.2)
    raise SimError(f"sshd of {spec.name} did not listen on {spec.address}:{spec.port} within "
                   f"{START_TIMEOUT:.0f}s; see {inside(root, SSHD_LOGFILE)}")


def stop(root: Path, grace: float = 5.0) -> None:
    """Stop the listening sshd (its sessions end with it); thaws first if frozen."""
    pid = running_pid(root)
    if pid is None:
        return
    thaw(root)
    signal_pids([pid], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc_state(pid) not in (None, "Z"):
        time.sleep(0.1)
    inside(root, SSHD_PIDFILE).unlink(missing_ok=True)


def freeze(root: Path, running: bool = True) -> list[int]:
    """SIGSTOP the device's sshd so it hangs like a wedged board; see ``pipeline.sim.freeze``."""
    pid = running_pid(root)
    if pid is None:
        raise SimError("device is not up: nothing to freeze")
    # The listener first, so it cannot fork new sessions while we stop the existing ones.
    targets = [pid] + (children_of(pid) if running else [])
    signal_pids(targets, signal.SIGSTOP)
    # kill() returns before the kernel has stopped the process; wait until /proc says so, or
    # a caller that checks the state right away (status, tests) races the signal.
    deadline = time.monotonic() + 5.0
    while proc_state(pid) not in ("T", None) and time.monotonic() < deadline:
        time.sleep(0.01)
    return targets


def thaw(root: Path) -> list[int]:
    """SIGCONT every stopped process of the device (sessions first, the listener last)."""
    stopped = [p for p in pids_in_root(root) if proc_state(p) == "T"]
    pid = running_pid(root)
    ordered = [p for p in stopped if p != pid] + ([pid] if pid in stopped else [])
    signal_pids(ordered, signal.SIGCONT)
    return ordered


def is_frozen(root: Path) -> bool:
    """True when the listening sshd is stopped (SIGSTOP)."""
    pid = running_pid(root)
    return pid is not None and proc_state(pid) == "T"


def ssh_command(spec: SimSpec, root: Path, command: str, timeout: float = 30.0) -> str:
    """Run ``command`` on the device over real SSH and return its stdout (stripped).

    The device's host key is taken from its rootfs and is the only key accepted (RejectPolicy):
    this verifies the host, it never trusts whatever answers. Nothing is written to any
    known_hosts file.

    Raises:
        SimError: Connection, authentication, timeout or non-zero exit.
    """
    try:
        import paramiko  # lazy: only status and tests need it
    except ImportError as err:
        raise SimError("paramiko is needed to probe a device: pip install 'edgeship[deploy]'") from err

    kind, blob = host_public_key_line(root).split()
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[{spec.address}]:{spec.port}", kind,
                               paramiko.PKey.from_type_string(kind, base64.b64decode(blob)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(spec.address, port=spec.port, username=DEVICE_USER,
                       key_filename=str(client_key_path()), timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout,
                       look_for_keys=False, allow_agent=False)
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode()
        status = stdout.channel.recv_exit_status()
        if status != 0:
            raise SimError(f"`{command}` on {spec.name} exited {status}: {stderr.read().decode().strip()}")
        return out.strip()
    except (paramiko.SSHException, OSError) as err:
        raise SimError(f"ssh to {spec.name} ({spec.address}:{spec.port}) failed: {err}") from err
    finally:
        client.close()
