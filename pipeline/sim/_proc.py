"""Bounded subprocesses, the mount table and processes living in a chroot.

Every external command runs with a timeout and in its own process group, so a timeout kills the
whole tree (debootstrap and pip spawn children that ``subprocess.run`` alone would orphan).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.sim.errors import SimError

#: Environment for commands run inside a chroot: nothing of the host's (PIP_*, proxies, venvs)
#: leaks in except what the caller adds on purpose.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a hard timeout, stdout and stderr merged into ``.stdout``.

    Args:
        cmd: Argument vector.
        timeout: Seconds before the whole process group is killed.
        env: Full environment (None: inherit).
        check: Raise SimError on a non-zero exit.
        what: Short description for error messages (default: the program name).

    Raises:
        SimError: On timeout, or on failure when ``check``; the message ends with the output's
            last line, the one that usually says why.
    """
    label = what or Path(cmd[0]).name
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise SimError(f"{label} timed out after {timeout:.0f}s: {last_line(out)}") from None
    except BaseException:
        # Ctrl-C / SIGTERM (the CLI maps it to KeyboardInterrupt): the child runs in its own
        # session and would not see the signal, so take its whole tree down with us.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise SimError(f"{label} failed (exit {proc.returncode}): {last_line(out)}")
    return result


def last_line(text: str | None) -> str:
    """The last non-empty line of ``text`` (or a placeholder)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def is_mounted(path: Path) -> bool:
    """True when ``path`` itself is a mount point."""
    return Path(os.path.realpath(path)) in mounts_under(path)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below ``path``; lazily if a mount stays busy.

    Raises:
        SimError: If something is still mounted afterwards (the caller must then not delete).
    """
    for point in mounts_under(path):
        res = run(["umount", str(point)], timeout=60, check=False)
        if res.returncode != 0:
            run(["umount", "-l", str(point)], timeout=60, check=False)
    left = mounts_under(path)
    if left:
        raise SimError(f"could not unmount {left[0]}; run: umount -l {left[0]}")


def pids_in_root(root: Path) -> list[int]:
    """Processes whose root directory is ``root`` (i.e. running inside that chroot)."""
    target = os.path.realpath(root)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/root") == target:
                pids.append(int(entry))
        except OSError:
            continue  # the process exited meanwhile, or is not ours to inspect
    return pids


def children_of(pid: int) -> list[int]:
    """All descendants of ``pid`` (read from /proc, no psutil)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may hold spaces, so split after ')'.
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == cur]
        out.extend(kids)
        frontier.extend(kids)
    return out


def proc_state(pid: int) -> str | None:
    """One-letter state of ``pid`` (``T`` = stopped), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def signal_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid, ignoring ones that already exited."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def kill_root(root: Path, grace: float = 5.0) -> None:
    """Terminate every process running inside ``root``: SIGTERM (+SIGCONT), then SIGKILL."""
    pids = pids_in_root(root)
    signal_pids(pids, signal.SIGTERM)
    # A stopped (frozen) process only acts on SIGTERM once continued.
    signal_pids(pids, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pids_in_root(root):
        time.sleep(0.1)
    signal_pids(pids_in_root(root), signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pids_in_root(root):
        time.sleep(0.1)
