"""The Transport: one device (local or one SSH host), its releases, its agent, its lock."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

from pipeline.errors import DeviceError, Interrupted, SpecError
from pipeline.spec import Host, TargetSpec
from pipeline.transport.base import CommandTimeout, Executor, ProgressFn, python_cmd, q, with_deadline
from pipeline.transport.lock import DeviceLock
from pipeline.transport.local import LocalExecutor
from pipeline.transport.releases import FaultHooks, ReleaseStore

_PROBE_SOURCE = (Path(__file__).resolve().parent.parent / "agent" / "probe.py").read_text(encoding="utf-8")
_PROBE_TRAILER = """
import json as _json, sys as _sys
_out = probe()
_pk = {}
try:
    from importlib import metadata as _md
    for _n in _json.loads(_sys.argv[1]):
        try:
            _pk[_n] = _md.version(_n)
        except _md.PackageNotFoundError:
            _pk[_n] = None
except ImportError:
    pass  # python < 3.8 has no importlib.metadata: packages stay unknown and check() says so
_out["packages"] = _pk
print(_json.dumps(_out))
"""


class Transport:
    """A device reached through an executor. Use as a context manager (closes the connection).

    Mutating operations (deploy, rollback, provision) take the device lock themselves unless the
    caller already holds it through :meth:`lock` (then they reuse it: hold the lock across deploy
    and validation so nobody switches ``current`` under a running agent).
    """

    def __init__(self, target: TargetSpec, executor: Executor, *, host: Host | None, root: str,
                 agent_python: str, helper_python: str, lock_wait_s: float) -> None:
        self.target = target
        self.executor = executor
        self.host = host
        self.name = host.name if host is not None else target.name
        self.root = root
        self.agent_python = agent_python
        self.lock_wait_s = lock_wait_s
        self.store = ReleaseStore(executor, root, helper_python, target.transport.command_timeout_s)
        self._helper_python = helper_python
        self._lock: DeviceLock | None = None
        #: Set by the fleet on Ctrl-C/SIGTERM: nothing new starts (no upload, switch or agent).
        self.cancel: threading.Event | None = None

    @property
    def hooks(self) -> FaultHooks:
        """Fault-injection hooks (tests only)."""
        return self.store.hooks

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.executor.close()

    # -- lock ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait_s: float) -> Iterator[DeviceLock]:
        """Hold the per-device deploy lock for the ``with`` block (waits up to ``wait_s``)."""
        if self._lock is not None:
            yield self._lock  # re-entrant within one transport
            return
        ts = self.target.transport
        self.store.op("claim", {})  # refuse someone else's folder before even the lock file lands there
        lk = DeviceLock(self.executor, self.root, self._helper_python, wait_s, ts.keepalive_s,
                        startup_s=ts.connect_timeout_s + 10.0)
        with lk:
            self._lock = lk
            try:
                yield lk
            finally:
                self._lock = None

    def _ensure_locked(self) -> None:
        if self._lock is None:
            raise DeviceError(f"{self.name}: deploy lock not held; this is a bug in the caller")
        self._lock.ensure_held()

    def _not_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted(f"{self.name}: interrupted before the next step; nothing more was changed")

    def _ensure_deployable(self) -> None:
        """Before each upload and before the switch: still locked, and not interrupted."""
        self._not_cancelled()
        self._ensure_locked()

    # -- device facts ----------------------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        """What the device is (the agent's probe, run with the runtime interpreter if it exists)."""
        names = sorted(self.target.runtime.packages)
        code = _PROBE_SOURCE + _PROBE_TRAILER
        py = self.agent_python
        cmd = (f"mkdir -p {q(self.root)} && cd {q(self.root)} && export EDGESHIP_DEVICE_ROOT={q(self.root)} && "
               f"if [ -x {q(py)} ]; then P={q(py)}; else P=$(command -v python3); fi && "
               f"exec \"$P\" -c {q(code)} {q(json.dumps(names))}")
        r = self.executor.run(cmd, self.target.transport.connect_timeout_s + 60.0)
        lines = r.out.strip().splitlines()
        if r.rc != 0 or not lines:
            raise DeviceError(f"{self.executor.name}: probe failed: {r.tail()}; does the device have python3?")
        try:
            out: dict[str, Any] = json.loads(lines[-1])
        except ValueError:
            raise DeviceError(f"{self.executor.name}: probe printed no JSON: {lines[-1][:120]}") from None
        out["runtime_python"] = py
        out["runtime_python_ok"] = out.get("python_executable") == py
        out["host"] = self.executor.name
        return out

    def check(self, target: TargetSpec, probe: dict[str, Any]) -> None:
        """Refuse a device that is not what ``target`` says: arch, python, runtime packages."""
        from pipeline.transport.device import check_probe

        check_probe(target, probe, self.executor.name, self.host)

    def provision(self, target: TargetSpec) -> dict[str, Any]:
        """Create the runtime venv with the target's pinned packages (idempotent)."""
        from pipeline.transport.device import provision

        with self.lock(self.lock_wait_s):
            return provision(self, target)

    # -- releases --------------------------------------------------------------------------------

    def deploy(self, release_dir: Path, release_id: str, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Ship a release folder and make it current. Returns ``{"release_id", "bytes_moved",
        "changed", "previous", "path", ...}``; an unchanged release moves 0 bytes."""
        ts = self.target.transport
        with self.lock(self.lock_wait_s):
            return self.store.deploy(Path(release_dir), release_id, keep=ts.keep_releases,
                                     transfer_timeout_s=ts.transfer_timeout_s,
                                     ensure_locked=self._ensure_deployable, progress=progress)

    def rollback(self, to: str | None = None, spec: str | None = None) -> str | None:
        """Switch the spec's ``current`` back to its previous (or the given) release; returns its id.
        ``spec`` None: the only spec with releases on the device."""
        with self.lock(self.lock_wait_s):
            return self.store.rollback(spec, to, self._ensure_locked)

    def clear(self, spec: str) -> None:
        """Leave ``spec`` with no current release on the device (nothing good to go back to)."""
        with self.lock(self.lock_wait_s):
            self.store.clear(spec, self._ensure_locked)

    def record(self, spec: str, release_id: str, outcome: dict[str, Any]) -> None:
        """Keep the gate outcome of the deploy that shipped ``release_id`` on the device."""
        with self.lock(self.lock_wait_s):
            self.store.record(spec, release_id, outcome)

    def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        """The store's listing; an old-layout root is migrated first (once, under the lock)."""
        out = self.store.op("list", args)
        if out.get("legacy"):
            with self.lock(self.lock_wait_s):
                self.store.op("migrate", {})
            out = self.store.op("list", args)
        return out

    def state(self) -> dict[str, dict[str, Any]]:
        """Every spec's releases: ``{spec: {"current", "previous", "releases", "details"}}``."""
        return dict(self._list({})["specs"])

    def slot(self, spec: str | None = None) -> dict[str, Any]:
        """One spec's ``{"spec", "current", "previous", "releases", "details"}`` (None: the only spec)."""
        return dict(self._list({"spec": spec})["slot"])

    def current(self, spec: str | None = None) -> str | None:
        return self.slot(spec)["current"]

    def releases(self, spec: str | None = None) -> list[str]:
        return list(self.slot(spec)["releases"])

    def verify_current(self, spec: str | None = None) -> str:
        """Re-hash the spec's current release on the device; its id, or DeviceError naming a bad file."""
        res = self.store.op("verify", {"spec": spec})
        if res.get("release") is None:
            raise DeviceError(f"{self.executor.name}: no release {f'of spec {spec} ' if spec else ''}is current "
                              f"under {self.root}; run `edgeship deploy` first")
        if not res["ok"]:
            bad = res["bad"]
            raise DeviceError(f"{self.executor.name}: release {res['release']} is damaged: {', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''} {'does' if len(bad) == 1 else 'do'} not match the "
                              "manifest's sha256; nothing was measured, run `edgeship deploy` to repair it")
        return str(res["release"])

    def stop_agent(self) -> int:
        """Stop the agent this host started last on the device (its process group); how many died."""
        res = self.store.op("stop_agent", {}, timeout=30.0)
        if not res["ok"]:
            raise DeviceError(f"{self.executor.name}: agent processes {res['left']} survived SIGKILL; "
                              "check the device")
        return int(res["stopped"])

    def read_current_manifest(self, spec: str | None = None) -> str:
        """Text of the spec's current manifest.json (DeviceError when nothing is deployed)."""
        slot = self.slot(spec)
        if slot["current"] is None:
            raise DeviceError(f"{self.executor.name}: no release {f'of spec {spec} ' if spec else ''}is current "
                              f"under {self.root}; run `edgeship deploy` first")
        return self.executor.get(f"{self.root}/{slot['spec']}/current/manifest.json",
                                 self.target.transport.command_timeout_s).decode()

    def run_agent(self, args: list[str], timeout_s: float, spec: str | None = None) -> dict[str, Any]:
        """``<python> -m edgeship_agent <args>`` in the spec's current release (pass ``--release .``);
        ``spec`` None: the only spec on the device.

        Runs in the release folder ``current`` resolves to at start, so a later switch does not
        change a running validation. Returns the agent's JSON; DeviceError otherwise.
        """
        self._not_cancelled()
        root = q(self.root)
        # Without a spec the device's only current release is found by the same command (one
        # round trip: a device that stops answering fails on the agent's own deadline).
        pick = (f"cur={q(f'{self.root}/{spec}/current')}" if spec else
                f"set -- {root}/*/current; [ \"$#\" -le 1 ] || {{ echo 'several specs' >&2; exit 96; }}; cur=\"$1\"")
        argv = " ".join(q(a) for a in args)
        token = secrets.token_hex(8)
        # The shell's pid is the agent's process group (sshd and the local executor start each
        # command in a session of its own; exec keeps the pid): stop_agent() kills that group.
        cmd = (f"{pick}; [ -e \"$cur\" ] || {{ echo 'no release deployed' >&2; exit 97; }}; "
               f"cd \"$cur\" && cd \"$(pwd -P)\" && export PYTHONPATH=\"$PWD\" "
               f"EDGESHIP_DEVICE_ROOT={root} EDGESHIP_AGENT_TOKEN={token} && "
               f"echo \"$$ {token}\" > {root}/.agent.pid && "
               + with_deadline(f"{q(self.agent_python)} -m edgeship_agent {argv}", timeout_s))
        # The device's own timeout(1) fires first and reports 124; the host deadline is the backstop.
        try:
            r = self.executor.run(cmd, timeout_s + 5.0)
        except CommandTimeout:
            raise CommandTimeout(f"{self.executor.name}: agent {' '.join(args[:1])} did not finish within {timeout_s:g} s "
                                 "and the device stopped answering (frozen or overloaded?); check the device") from None
        if r.rc == 96:
            raise DeviceError(f"{self.executor.name}: {self.root} holds current releases of several specs; "
                              "name one with --spec")
        if r.rc == 97:
            raise DeviceError(f"{self.executor.name}: no release deployed under {self.root}; run `edgeship deploy` first")
        if r.rc == 124:
            raise DeviceError(f"{self.executor.name}: agent {' '.join(args[:1])} did not finish within {timeout_s:g} s "
                              "and was stopped; raise the timeout or reduce validation runs")
        lines = r.out.strip().splitlines()
        if r.rc < 0:  # ssh: no exit status (killed by a signal); local: -signal
            raise DeviceError(f"{self.executor.name}: agent {' '.join(args[:1])} was killed by a signal (out of memory, "
                              f"or a crash in the runtime?); {r.tail(2)}")
        if r.rc != 0 or not lines:
            raise DeviceError(f"{self.executor.name}: agent {' '.join(args[:1])} failed (exit {r.rc}): {r.tail(2)}")
        try:
            return dict(json.loads(lines[-1]))
        except ValueError:
            raise DeviceError(f"{self.executor.name}: agent printed no JSON (last line: {lines[-1][:120]!r}); "
                              f"stderr: {r.tail()}") from None


def pick_host(target: TargetSpec, name: str | None) -> Host:
    """The host called ``name``, or the only host of the target."""
    hosts = target.transport.hosts
    if name is not None:
        for h in hosts:
            if name in (h.name, h.host):
                return h
        raise DeviceError(f"target {target.name} has no host {name!r}; hosts: "
                          f"{', '.join(h.name for h in hosts) or 'none'}")
    if len(hosts) != 1:
        raise DeviceError(f"target {target.name} has {len(hosts)} hosts; name one with --host")
    return hosts[0]


def _local_transport(target: TargetSpec, lock_wait_s: float) -> Transport:
    root = str(Path(os.path.expanduser(target.transport.device_root(target.name))).resolve())
    configured = os.path.expanduser(target.transport.python)
    # The local device's interpreter: the configured one when it is a real file, else this one.
    agent_py = configured if os.path.isabs(configured) and os.path.exists(configured) else sys.executable
    Path(root).mkdir(parents=True, exist_ok=True)
    ex = LocalExecutor(f"{target.name} (local {root})")
    return Transport(target, ex, host=None, root=root, agent_python=agent_py,
                     helper_python=q(sys.executable), lock_wait_s=lock_wait_s)


def placeholder_error(target: TargetSpec, host: Host) -> SpecError:
    """A shipped example target (rpi4, jetson, ...) still naming its stand-in host: say what to copy."""
    where = target.source_path
    fix = (f"copy targets/{where.name} and set transport.hosts" if where is not None and where.parent.name == "targets"
           else f"set transport.hosts in {where or 'the target'}")
    return SpecError(f"target {target.name}: host {host.host} is the shipped example's placeholder; {fix} "
                     "(a real host, without placeholder: true)")


def open_transport(target: TargetSpec, host: Host | None = None, *, lock_wait_s: float = 60.0) -> Transport:
    """A connected Transport for ``target`` (for SSH: ``host``, or the target's only host).

    SSH connections are opened here, so host-key refusal and unreachable devices surface at once.
    """
    if target.transport.kind == "local":
        return _local_transport(target, lock_wait_s)
    from pipeline.transport.ssh import SshExecutor

    h = host or pick_host(target, None)
    if h.placeholder:
        raise placeholder_error(target, h)
    ex = SshExecutor(target, h)
    ex.connect()
    root = target.transport.device_root(target.name)
    if root.startswith("~"):
        r = ex.run('printf %s "$HOME"', target.transport.connect_timeout_s)
        root = r.out.strip() + root[1:]
    py = target.transport.python
    return Transport(target, ex, host=h, root=root.rstrip("/") or "/", agent_python=py,
                     helper_python=python_cmd(py), lock_wait_s=lock_wait_s)
