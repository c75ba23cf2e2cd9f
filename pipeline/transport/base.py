"""The small interface every transport's executor implements, and errors shared by all of them.

The release store, the lock, probing and provisioning are written once (``releases.py``,
``lock.py``, ``device.py``) against :class:`Executor`; a transport only says how to run a shell
command on the device, move a file there and keep a long-lived process (the lock holder) alive.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from pipeline.errors import DeviceError

ProgressFn = Callable[[str, int, int], None]
"""``progress(relative_path, bytes_done, bytes_total)``, called while a file is uploaded."""


@dataclass(frozen=True)
class Result:
    """A finished device command."""

    rc: int
    out: str
    err: str

    def tail(self, lines: int = 1) -> str:
        """The last non-empty lines of stderr (else stdout), for one-line error messages."""
        text = (self.err or self.out).strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:]) or f"exit status {self.rc}, no output"


class CommandTimeout(DeviceError):
    """A device command or transfer ran past its deadline (the device may be frozen or overloaded)."""


class Process(Protocol):
    """A long-lived device process with a stdin pipe (used for the lock holder)."""

    def readline(self, timeout: float) -> str | None:
        """One line of its stdout without the newline; None on timeout; '' when it ended."""

    def write(self, data: bytes) -> None:
        """Write to its stdin; raises OSError (or a subclass) when the process or channel is gone."""

    def alive(self) -> bool:
        """Whether it is still running (as far as the host can tell)."""

    def stderr_tail(self) -> str:
        """What it wrote to stderr, last line, once it has ended."""

    def close(self) -> None:
        """Close its stdin (it then exits) and release the channel/pipes. Never raises."""


class Executor(Protocol):
    """How to reach one device. Implementations: local.LocalExecutor, ssh.SshExecutor."""

    name: str
    """Human name for messages, e.g. ``sim-arm64 (127.0.0.2:2222)``."""

    def run(self, cmd: str, timeout: float, stdin: str | None = None) -> Result:
        """Run a POSIX shell command line on the device. Raises CommandTimeout/DeviceError."""

    def put(self, local: Path, remote: str, timeout: float, offset: int = 0,
            progress: Callable[[int], None] | None = None) -> int:
        """Upload ``local`` to ``remote`` (from byte ``offset``: resume). Returns bytes sent."""

    def get(self, remote: str, timeout: float) -> bytes:
        """Read a (small) file from the device."""

    def spawn(self, cmd: str) -> Process:
        """Start a long-lived shell command whose stdin we hold open."""

    def close(self) -> None:
        """Drop the connection. Never raises."""


def q(value: str | Path) -> str:
    """Shell-quote one word."""
    return shlex.quote(str(value))


def python_cmd(preferred: str | None, fallback: str = "python3") -> str:
    """Shell expression naming the interpreter for stdlib-only helpers on the device.

    The configured interpreter when it exists on the device (one interpreter, one environment,
    e.g. the one a test runs under libfaketime), else the system ``python3``: the runtime venv
    does not exist before ``provision``.
    """
    if preferred is None:
        return q(fallback)
    p = q(preferred)
    return f'"$(if [ -x {p} ]; then echo {p}; else command -v {q(fallback)} || echo {p}; fi)"'


def with_deadline(cmd: str, seconds: float) -> str:
    """Wrap a command in coreutils/busybox ``timeout`` when the device has it.

    The host-side deadline only closes the channel; a process on the device keeps running after
    that unless the device itself enforces the same limit.
    """
    s = max(1, int(seconds + 0.999))
    return (f"if command -v timeout >/dev/null 2>&1; then exec timeout -k 5 {s} {cmd}; "
            f"else exec {cmd}; fi")
