"""The per-device deploy lock: ``flock(2)`` held by a process ON the device.

Why a lock-holding remote process (and not ``flock -w N file cmd`` per command, or a lock file):
  * flock is released by the kernel when its holder dies, so a crashed deploy never leaves a
    stale lock behind: "a dead holder's lock is taken over" needs no cleanup code.
  * The holder's lifetime is tied to the deploy: it runs on its own SSH channel (or pipe, locally)
    and exits on EOF of its stdin, i.e. when the host closes the lock, when the host process dies
    (the TCP connection closes, sshd closes the channel) or, for a host that vanished without
    closing anything (power cut, network partition), when the host's heartbeat stops for
    ``stale_s``. Every command of the deploy runs on other channels while the lock is held.
  * It is a few lines of stdlib Python rather than util-linux ``flock`` because it also records
    who holds the lock (shown to the one who waits) and needs nothing the agent does not need.
The host checks :meth:`DeviceLock.ensure_held` right before the switch, so a lock lost mid-deploy
(heartbeat stopped, holder killed) aborts before anything visible changes.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
from types import TracebackType

from pipeline.errors import DeviceError
from pipeline.transport.base import Executor, Process, q

HOLDER = r"""
import fcntl, json, os, select, sys, time
a = json.loads(sys.argv[1])
root = a["root"]
os.makedirs(root, exist_ok=True)
fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
end = time.monotonic() + a["wait"]
said = 0.0
print("STARTED", flush=True)
while True:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except OSError:
        now = time.monotonic()
        if now >= end or now - said >= 2.0:
            try:
                with open(os.path.join(root, ".lock.owner")) as fh:
                    who = fh.read().strip()
            except OSError:
                who = "unknown holder"
            if now >= end:
                print("BUSY " + who, flush=True)
                sys.exit(3)
            print("WAITING " + who, flush=True)  # also a sign of life while we wait
            said = now
        time.sleep(0.2)
with open(os.path.join(root, ".lock.owner"), "w") as fh:
    fh.write("%s (device pid %d) since %s" % (a["owner"], os.getpid(),
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())))
print("LOCKED %d" % os.getpid(), flush=True)
while True:
    r, _, _ = select.select([0], [], [], a["stale"])
    if not r:
        sys.exit(4)  # the host went silent: give the lock up rather than hold it forever
    if not os.read(0, 64):
        sys.exit(0)  # EOF: the host closed the lock, or its connection is gone
"""


class DeviceLock:
    """Context manager holding the device's deploy lock; see the module docstring."""

    def __init__(self, executor: Executor, root: str, python: str, wait_s: float,
                 heartbeat_s: float, startup_s: float) -> None:
        self._ex = executor
        self._root = root
        self._python = python
        self.wait_s = wait_s
        self._heartbeat_s = heartbeat_s
        self._stale_s = max(30.0, 3 * heartbeat_s)
        self._startup_s = startup_s
        self._proc: Process | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self.device_pid: int | None = None
        self._lost_reason = "holder gone"

    def _owner(self) -> str:
        return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"

    def __enter__(self) -> "DeviceLock":
        args = {"root": self._root, "wait": self.wait_s, "stale": self._stale_s, "owner": self._owner()}
        proc = self._ex.spawn(f"exec {self._python} -c {q(HOLDER)} {q(json.dumps(args))}")
        # The holder says something at least every 2 s while it waits, so a silent device is
        # recognised after ``startup_s``, not after the whole (possibly long) lock wait.
        deadline = time.monotonic() + self.wait_s + self._startup_s
        line: str | None = ""
        while True:
            line = proc.readline(max(0.1, min(self._startup_s, deadline - time.monotonic())))
            if line is None or not line.startswith(("STARTED", "WAITING")) or time.monotonic() >= deadline:
                break
        if line is not None and line.startswith("LOCKED"):
            self._proc = proc
            self.device_pid = int(line.split()[1])
            self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self._ex.name}", daemon=True)
            self._thread.start()
            return self
        proc.close()
        if line is not None and line.startswith("BUSY"):
            raise DeviceError(f"{self._ex.name} is busy: {line[5:]} holds its deploy lock (waited {self.wait_s:g} s); "
                              "retry when it finishes (a dead holder's lock frees itself)")
        why = (f"no answer within {self._startup_s:g} s: frozen or overloaded?" if line is None
               else (proc.stderr_tail() or line or "it exited"))
        raise DeviceError(f"{self._ex.name}: could not take the deploy lock under {self._root} ({why}); "
                          "check that the device has python3 and transport.root is writable")

    def _beat(self) -> None:
        """Write a byte every heartbeat so the holder knows we are alive; note when we can't."""
        while not self._stop.wait(self._heartbeat_s):
            proc = self._proc
            if proc is None:
                return
            try:
                proc.write(b"\n")
            except (OSError, EOFError) as exc:
                # Not swallowed: ensure_held() turns this into a DeviceError before any switch.
                self._lost_reason = f"heartbeat failed: {exc or type(exc).__name__}"
                self._lost.set()
                return
            if not proc.alive():
                self._lost_reason = "the lock holder on the device exited"
                self._lost.set()
                return

    def ensure_held(self) -> None:
        """Raise DeviceError if the lock was lost (call right before changing what is visible)."""
        if self._proc is None:
            raise DeviceError(f"{self._ex.name}: deploy lock not held; this is a bug in the caller")
        if self._lost.is_set() or not self._proc.alive():
            raise DeviceError(f"{self._ex.name}: lost the deploy lock ({self._lost_reason}); "
                              "nothing was switched, rerun the deploy")

    def release(self) -> None:
        """Let go of the lock (closing the holder's stdin makes it exit; flock is then released)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._heartbeat_s + 5)
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

