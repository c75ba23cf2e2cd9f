"""SSH executor (Fabric): verified host keys, deadlines on every step, typed errors.

Deadlines:
  * connect: TCP connect, SSH banner, authentication and channel opening each get
    ``transport.connect_timeout_s`` (paramiko ``timeout``/``banner_timeout``/``auth_timeout``/
    ``channel_timeout``);
  * commands: invoke's ``timeout=`` (closes the channel) plus ``timeout(1)`` on the device;
  * transfers: a per-file watchdog that closes the SFTP channel at ``transfer_timeout_s``, and a
    socket timeout on the channel so a stalled window raises instead of blocking;
  * keepalive: ``Transport.set_keepalive(keepalive_s)`` keeps NAT/firewall state alive on long
    validations.
A frozen device therefore surfaces as a DeviceError within the relevant deadline, never a hang.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from io import StringIO
from pathlib import Path
from typing import Callable

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut
from paramiko.ssh_exception import NoValidConnectionsError

from pipeline.errors import DeviceError, SpecError
from pipeline.spec import Host, TargetSpec
from pipeline.transport import hostkeys
from pipeline.transport.base import CommandTimeout, Result

_CHUNK = 256 * 1024

# paramiko's transport thread logs every failed handshake with a traceback; with no handler
# configured Python prints that to stderr. We turn each failure into one DeviceError line instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
_NET_ERRORS = (OSError, EOFError, paramiko.SSHException)


def _failure_kind(exc: BaseException, elapsed: float, limit: float) -> str:
    """``"timeout"`` (the peer said nothing in time), ``"closed"`` (it hung up) or ``"other"``.

    paramiko wraps both in the same SSHException ("Error reading SSH protocol banner"); the cause
    it was raised from tells them apart: a timeout, or an EOF/reset when the peer closed the
    connection (sshd's MaxStartups, a tcp wrapper, a service restarting). Without a cause, only
    the clock can: a failure well before the deadline was not a timeout.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; a cycle must not loop forever
        if seen is None:
            break
        if isinstance(seen, (socket.timeout, TimeoutError)):
            return "timeout"
        if isinstance(seen, (EOFError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "closed"
        seen = seen.__cause__ or seen.__context__
    if any(m in str(exc) for m in ("banner", "Timeout", "No existing session")):
        return "timeout" if elapsed >= 0.9 * limit else "closed"
    return "other"


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectUnknown(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising a type we can turn into an actionable message."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname)


class _SshProcess:
    """A command on its own SSH channel whose stdin we keep open (the lock holder)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self._buf = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._chan.settimeout(left)
            try:
                chunk = self._chan.recv(4096)
            except socket.timeout:
                return None
            if not chunk:
                line, self._buf = self._buf, b""
                return line.decode(errors="replace")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def write(self, data: bytes) -> None:
        self._chan.settimeout(10.0)
        self._chan.sendall(data)

    def alive(self) -> bool:
        return not self._chan.closed and not self._chan.exit_status_ready()

    def stderr_tail(self) -> str:
        self._chan.settimeout(1.0)
        data = b""
        try:
            while self._chan.recv_stderr_ready():
                data += self._chan.recv_stderr(4096)
        except (socket.timeout, OSError):
            pass  # best effort: this only decorates an error message
        lines = data.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        try:
            self._chan.shutdown_write()
        except _NET_ERRORS:
            pass  # the channel is already gone: the holder has exited, which is the goal
        self._chan.close()


class SshExecutor:
    """One SSH connection to one host of a target."""

    def __init__(self, target: TargetSpec, host: Host) -> None:
        self.target = target
        self.host = host
        self.name = f"{host.name} ({hostkeys.address(host)})"
        self._conn: Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection, refusing unknown or changed host keys before authenticating."""
        ts = self.target.transport
        h = self.host
        known = hostkeys.known_hosts_path(self.target)
        key_file = os.path.expanduser(h.key_file) if h.key_file else None
        if key_file and not os.path.isfile(key_file):
            # A mistake in the target file (exit 2), not a device that does not answer.
            raise SpecError(f"{self.name}: key_file {key_file} not found; fix transport.hosts[].key_file "
                            f"in {self.target.source_path or 'the target'}")
        kw: dict = {"look_for_keys": False, "allow_agent": True, "banner_timeout": ts.connect_timeout_s,
                    "auth_timeout": ts.connect_timeout_s, "channel_timeout": ts.connect_timeout_s}
        if key_file:
            kw["key_filename"] = key_file
        # An explicit empty SSHConfig: ~/.ssh/config must not redirect a target to another host.
        conn = Connection(h.host, user=h.user, port=h.port, config=Config(ssh_config=paramiko.SSHConfig()),
                          connect_timeout=max(1, math.ceil(ts.connect_timeout_s)), connect_kwargs=kw)
        # Fabric installs AutoAddPolicy; replace it and trust nothing but edgeship's known_hosts.
        conn.client.set_missing_host_key_policy(_RejectUnknown())
        if known.is_file():
            conn.client.load_host_keys(str(known))
        t0 = time.monotonic()
        try:
            conn.open()
        except _UnknownHostKey:
            conn.close()
            raise DeviceError(f"host key of {hostkeys.address(h)} is not trusted; run "
                              f"`edgeship devices trust {self.target.name}` to check and enrol its fingerprint") from None
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise DeviceError(
                f"host key of {hostkeys.address(h)} CHANGED to {hostkeys.fingerprint(exc.key)} (known: "
                f"{hostkeys.fingerprint(exc.expected_key)}): possible man-in-the-middle, nothing was sent; "
                f"if the device was reinstalled, check the new key on its console and run "
                f"`edgeship devices trust {self.target.name} --fingerprint {hostkeys.fingerprint(exc.key)}`") from None
        except paramiko.AuthenticationException as exc:
            conn.close()
            raise DeviceError(f"{self.name}: {h.user} was refused ({exc}); check key_file and the device's "
                              "authorized_keys") from None
        except NoValidConnectionsError:
            conn.close()
            raise DeviceError(f"{self.name}: connection refused; is sshd running on port {h.port}?") from None
        except _NET_ERRORS as exc:
            conn.close()
            kind = _failure_kind(exc, time.monotonic() - t0, ts.connect_timeout_s)
            if kind == "timeout":
                raise DeviceError(f"{self.name}: no SSH answer within {ts.connect_timeout_s:g} s; is the device up "
                                  "(and not frozen)?") from None
            if kind == "closed":
                raise DeviceError(f"{self.name}: the device closed the connection during the SSH handshake (after "
                                  f"{time.monotonic() - t0:.1f} s); is sshd overloaded (MaxStartups) or restarting, "
                                  "or does a firewall/tcp wrapper refuse this host?") from None
            raise DeviceError(f"{self.name}: SSH connection failed: {exc or type(exc).__name__}; check the device "
                              "and the network") from None
        assert conn.transport is not None
        conn.transport.set_keepalive(max(1, int(ts.keepalive_s)))
        self._conn = conn

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self.connect()
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        # Fabric closes the SSH transport first, then SFTP: nothing can block on a dead peer.
        self._sftp = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        """Tear the connection down, also from another thread (watchdog, fault injection).

        Closing the whole paramiko Transport (not one channel) is what unblocks a writer stuck on
        a frozen peer: paramiko retries a full socket until its packetizer is closed.
        """
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    # -- commands --------------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float, stdin: str | None = None) -> Result:
        limit = max(1, math.ceil(timeout))
        t0 = time.monotonic()
        timed_out = False
        try:
            r = self.conn.run(cmd, hide=True, warn=True, pty=False, timeout=limit,
                              in_stream=StringIO(stdin) if stdin is not None else False)
            # invoke decides "timed out" by whether its timer thread is still alive, which races with
            # the channel close its own timer triggers: a killed command can come back as an
            # ordinary result without exit status. Past the deadline with no status = timed out.
            timed_out = r.exited in (None, -1) and time.monotonic() - t0 >= limit - 0.05
        except CommandTimedOut:
            timed_out = True
        except _NET_ERRORS as exc:
            raise self._network_error(exc, f"connection lost while running a command ({exc or type(exc).__name__})") from None
        if timed_out:
            self._drop()  # a frozen peer leaves the connection unusable; the next call reconnects
            raise CommandTimeout(f"{self.name}: command did not finish within {timeout:g} s (device frozen or "
                                 "overloaded?); raise transport.command_timeout_s if the work is legitimately slow")
        return Result(r.exited if r.exited is not None else -1, r.stdout, r.stderr)

    def spawn(self, cmd: str) -> _SshProcess:
        try:
            t = self.conn.client.get_transport()
            assert t is not None
            chan = t.open_session(timeout=self.target.transport.connect_timeout_s)
            chan.exec_command(cmd)
        except _NET_ERRORS as exc:
            raise self._network_error(exc, f"cannot start a remote process ({exc})") from None
        return _SshProcess(chan)

    def _network_error(self, exc: BaseException, what: str) -> DeviceError:
        """Drop the broken connection and type the failure: a timeout (frozen peer) or a lost link."""
        self._drop()
        if _failure_kind(exc, 0.0, 0.0) == "timeout":
            return CommandTimeout(f"{self.name}: the device did not answer within "
                                  f"{self.target.transport.connect_timeout_s:g} s ({exc}); is it frozen or "
                                  "overloaded?")
        return DeviceError(f"{self.name}: {what}; check the device and retry")

    # -- files -----------------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.conn.sftp()
            except _NET_ERRORS as exc:
                self._drop()
                raise DeviceError(f"{self.name}: cannot open SFTP ({exc}); is the sftp subsystem enabled in sshd?") from None
        return self._sftp

    def _drop(self) -> None:
        """Forget a connection that failed; the next call reconnects."""
        self.abort()
        self.close()

    def put(self, local: Path, remote: str, timeout: float, offset: int = 0,
            progress: Callable[[int], None] | None = None) -> int:
        sftp = self._sftp_client()
        chan = sftp.get_channel()
        assert chan is not None
        # Socket-level stall guard: a blocked send/recv raises instead of waiting forever.
        chan.settimeout(min(timeout, max(5.0, self.target.transport.keepalive_s * 3)))
        expired = threading.Event()

        def _watchdog() -> None:
            expired.set()
            self.abort()

        timer = threading.Timer(timeout, _watchdog)
        timer.daemon = True
        moved = 0
        timer.start()
        try:
            with open(local, "rb") as src, sftp.open(remote, "r+b" if offset else "wb") as dst:
                dst.set_pipelined(True)
                src.seek(offset)
                dst.seek(offset)
                while not expired.is_set():
                    block = src.read(_CHUNK)
                    if not block:
                        break
                    dst.write(block)
                    moved += len(block)
                    if progress is not None:
                        progress(moved)
            if expired.is_set():
                raise socket.timeout("transfer deadline")
        except _NET_ERRORS as exc:
            self._sftp = None
            if expired.is_set() or isinstance(exc, socket.timeout):
                self._drop()
                raise CommandTimeout(f"{self.name}: upload of {local.name} did not finish within "
                                     f"{timeout:g} s (transfer_timeout_s); nothing was switched, the next deploy "
                                     "resumes it") from None
            self._drop()
            raise DeviceError(f"{self.name}: upload of {local.name} failed ({exc or type(exc).__name__}); nothing "
                              "was switched; check free space under transport.root and rerun to resume") from None
        finally:
            timer.cancel()
        return moved

    def get(self, remote: str, timeout: float) -> bytes:
        sftp = self._sftp_client()
        chan = sftp.get_channel()
        assert chan is not None
        chan.settimeout(timeout)
        try:
            with sftp.open(remote, "rb") as fh:
                return fh.read()
        except _NET_ERRORS as exc:
            self._sftp = None
            raise DeviceError(f"{self.name}: cannot read {remote} ({exc}); check the path") from None
