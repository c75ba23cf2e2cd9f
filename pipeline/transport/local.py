"""The host itself as a device: shell commands in a child process, files copied, same store.

Everything goes through ``sh -c`` exactly as on a remote device, so the local transport exercises
the same release logic and the agent always runs in a separate process.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from pipeline.errors import DeviceError
from pipeline.transport.base import CommandTimeout, Result

_CHUNK = 1 << 20


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the whole process group: ``sh -c`` children would otherwise hold our pipes open."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group already exited: the goal


class _LocalProcess:
    """A child process with stdin/stdout pipes (the local lock holder)."""

    def __init__(self, cmd: str) -> None:
        self._p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        self._buf = b""

    def readline(self, timeout: float) -> str | None:
        assert self._p.stdout is not None
        fd = self._p.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 4096)
                if not chunk:
                    return self._buf.decode(errors="replace") if self._buf else ""
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def write(self, data: bytes) -> None:
        assert self._p.stdin is not None
        self._p.stdin.write(data)
        self._p.stdin.flush()

    def alive(self) -> bool:
        return self._p.poll() is None

    def stderr_tail(self) -> str:
        if self.alive() or self._p.stderr is None:
            return ""
        lines = self._p.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        try:
            if self._p.stdin is not None:
                self._p.stdin.close()
        except OSError:
            pass  # it already exited; closing a broken pipe tells us nothing new
        try:
            self._p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(self._p)
            self._p.wait()
        for stream in (self._p.stdout, self._p.stderr):
            if stream is not None:
                stream.close()


class LocalExecutor:
    """Runs device commands on this machine, as this user."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, cmd: str, timeout: float, stdin: str | None = None) -> Result:
        proc = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise CommandTimeout(f"{self.name}: command did not finish within {timeout:.0f} s; "
                                 "raise transport.command_timeout_s if the work is legitimately slow") from None
        return Result(proc.returncode, out, err)

    def put(self, local: Path, remote: str, timeout: float, offset: int = 0,
            progress: Callable[[int], None] | None = None) -> int:
        deadline = time.monotonic() + timeout
        moved = 0
        try:
            with open(local, "rb") as src, open(remote, "r+b" if offset else "wb") as dst:
                src.seek(offset)
                dst.seek(offset)
                while True:
                    block = src.read(_CHUNK)
                    if not block:
                        break
                    if time.monotonic() > deadline:
                        raise CommandTimeout(f"{self.name}: copying {local.name} took longer than "
                                             f"transfer_timeout_s={timeout:g}; the next deploy resumes it")
                    dst.write(block)
                    moved += len(block)
                    if progress is not None:
                        progress(moved)
        except OSError as exc:
            raise DeviceError(f"{self.name}: copying {local} to {remote} failed: {exc.strerror or exc}; "
                              "check free space and permissions under transport.root") from None
        return moved

    def get(self, remote: str, timeout: float) -> bytes:
        try:
            return Path(remote).read_bytes()
        except OSError as exc:
            raise DeviceError(f"{self.name}: cannot read {remote}: {exc.strerror or exc}") from None

    def spawn(self, cmd: str) -> _LocalProcess:
        return _LocalProcess(cmd)

    def close(self) -> None:
        """Nothing to drop: there is no connection."""
