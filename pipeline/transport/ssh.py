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
import socket
import threading
import time
from io import StringIO
from pathlib import Path
from typing import Callable

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut

from pipeline.errors import DeviceError
from pipeline.spec import Host, TargetSpec
from pipeline.transport.base import CommandTimeout, Result
from pipeline.transport.sshconnect import NET_ERRORS, Link, describe, failure_kind, open_link
from pipeline.transport.sshconfig import resolve

_CHUNK = 256 * 1024

# paramiko's transport thread logs every failed handshake with a traceback; with no handler
# configured Python prints that to stderr. We turn each failure into one DeviceError line instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
_NET_ERRORS = NET_ERRORS  # the one list of network failures (sshconnect)


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
        self.endpoint = resolve(target, host)  # ~/.ssh/config applied: alias, user, port, jump hosts
        self.name = describe(host, self.endpoint)
        self._link: Link | None = None
        self._conn: Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (through any jump hosts), refusing unknown or changed host keys on
        every hop before authenticating there."""
        self._link = open_link(self.target, self.host, self.endpoint)
        self._conn = self._link.conn

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self.connect()
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        # Fabric closes the SSH transport first, then SFTP: nothing can block on a dead peer.
        self._sftp = None
        if self._link is not None:
            self._link.close()
        self._link = self._conn = None

    def abort(self) -> None:
        """Tear the connection down, also from another thread (watchdog, fault injection).

        Closing the whole paramiko Transport (not one channel) is what unblocks a writer stuck on
        a frozen peer: paramiko retries a full socket until its packetizer is closed.
        """
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.close()
        for gw in self._link.gateways if self._link is not None else []:
            if gw.transport is not None:
                gw.transport.close()

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
        if failure_kind(exc, 0.0, 0.0) == "timeout":
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
