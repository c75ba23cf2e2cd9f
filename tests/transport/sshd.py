"""A throwaway OpenSSH server on 127.0.0.5 for transport tests (the host's own /usr/sbin/sshd).

It serves the host itself as the "device": each test gets its own device root folder. The log
runs at DEBUG1 so a test can prove that no authentication was attempted (``userauth-request``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.spec import TargetSpec

ADDRESS = "127.0.0.5"
SSHD = "/usr/sbin/sshd"


def skip_reason() -> str | None:
    """Why ssh tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (sshd must run as root to log in as root)"
    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        return "needs openssh-server (apt-get install -y openssh-server)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@dataclass
class Sshd:
    """A running test sshd and everything needed to build targets for it."""

    dir: Path
    port: int
    proc: subprocess.Popen
    client_key: Path
    host_key: Path
    log: Path

    @property
    def host_key_line(self) -> str:
        return Path(str(self.host_key) + ".pub").read_text().strip()

    def target(self, root: Path, known_hosts: Path, **transport: Any) -> TargetSpec:
        """A TargetSpec for this sshd; ``transport`` overrides fields of transport."""
        data = {
            "name": "test-ssh", "arch": os.uname().machine,
            "transport": {"kind": "ssh", "root": str(root), "python": sys.executable,
                          "known_hosts": str(known_hosts), "connect_timeout_s": 5, "command_timeout_s": 60,
                          "transfer_timeout_s": 60, "keepalive_s": 2,
                          "hosts": [{"name": "testdev", "host": ADDRESS, "port": self.port, "user": "root",
                                     "key_file": str(self.client_key)}], **transport},
            "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
        }
        return TargetSpec.model_validate(data)

    def userauth_requests(self) -> int:
        """How many authentication requests sshd has seen so far."""
        return self.log.read_text(errors="replace").count("userauth-request")

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes and their commands (not the listener)."""
        return children(self.proc.pid)

    def freeze(self, pids: list[int]) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass  # a session that ended between listing and signalling: nothing left to stop

    def thaw(self, pids: list[int]) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the connection ended meanwhile: nothing left to thaw

    def stop(self) -> None:
        self.thaw(self.session_pids() + [self.proc.pid])
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(workdir: Path) -> Sshd:
    """Start sshd on 127.0.0.5:<free port> with fresh host and client keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    (workdir / "authorized_keys").write_text(Path(str(client_key) + ".pub").read_text())
    port = _free_port()
    log = workdir / "sshd.log"
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server") if Path(p).exists()),
                "internal-sftp")
    (workdir / "sshd_config").write_text(f"""
ListenAddress {ADDRESS}
Port {port}
HostKey {host_key}
PidFile {workdir}/sshd.pid
AuthorizedKeysFile {workdir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 50
MaxSessions 50
LogLevel DEBUG1
Subsystem sftp {sftp}
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
    proc = subprocess.Popen([SSHD, "-D", "-E", str(log), "-f", str(workdir / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {proc.stderr.read().decode() if proc.stderr else ''} "
                               f"{log.read_text() if log.exists() else ''}")
        try:
            with socket.create_connection((ADDRESS, port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    return Sshd(workdir, port, proc, client_key, host_key, log)
