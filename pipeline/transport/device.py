"""Device checks (does it match the target?) and provisioning (make it match)."""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Protocol

from pipeline.errors import DeviceError
from pipeline.spec import Host, TargetSpec
from pipeline.transport.base import Executor, q, with_deadline


class Probed(Protocol):
    """What provisioning needs of a transport (pipeline.transport.transport.Transport is one): named
    here so this module need not import the transport that calls it."""

    executor: Executor
    host: Host | None

    def probe(self) -> dict[str, Any]: ...

_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<|~=)?\s*([0-9][0-9.]*)\s*$")


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def python_satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` (e.g. "3.11.2") meets a simple specifier like ">=3.9,<4"."""
    have = _vtuple(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = _CLAUSE.match(clause)
        if m is None:
            raise DeviceError(f"runtime.python {spec!r}: cannot read clause {clause!r}; use e.g. '>=3.9'")
        op, want = m.group(1) or "==", _vtuple(m.group(2))
        cut = have[:len(want)]
        ok = {">=": cut >= want, "<=": cut <= want, "==": cut == want, "!=": cut != want,
              ">": cut > want, "<": cut < want, "~=": cut >= want and have[:len(want) - 1] == want[:-1]}[op]
        if not ok:
            return False
    return True


def _where(name: str, host: Host | None) -> str:
    return f"host {host.host}" if host is not None else name


def check_probe(target: TargetSpec, probe: dict[str, Any], name: str, host: Host | None) -> None:
    """DeviceError naming the mismatch and the fix, or None when the device fits the target."""
    arch = probe.get("arch")
    expected = host.arch if host is not None and host.arch else target.arch
    if arch != expected:
        raise DeviceError(f"target {target.name} expects {expected} but {_where(name, host)} is {arch}; "
                          "pick the target that matches this device")
    py = str(probe.get("python", "0"))
    if not python_satisfies(py, target.runtime.python):
        raise DeviceError(f"target {target.name} needs python {target.runtime.python} but {_where(name, host)} "
                          f"has {py}; install a newer python on the device")
    want_l4t = target.hardware.l4t
    if want_l4t:
        jet = probe.get("jetson") or {}
        have_l4t = str(jet.get("l4t") or "")
        # "36" accepts any r36.x, "36.4" any 36.4.y: the target names as much as it cares about.
        if have_l4t.split(".")[:len(want_l4t.split("."))] != want_l4t.split("."):
            raise DeviceError(f"target {target.name} expects L4T {want_l4t} but {_where(name, host)} has "
                              f"{'L4T ' + have_l4t if have_l4t else 'no L4T (not a Jetson)'}; flash the matching JetPack "
                              "or pick the target for this board")
        # No TensorRT on the board is not refused here: those runs fail on the device with the
        # agent's reason and the other backends are still measured and gated (exit 3, not 1).
    wanted = target.runtime.packages
    if not wanted:
        return
    fix = f"run `edgeship devices provision {target.name}`"
    if not probe.get("runtime_python_ok", False):
        raise DeviceError(f"{_where(name, host)} has no runtime environment at {probe.get('runtime_python')}; {fix}")
    have = probe.get("packages") or {}
    problems = []
    for pkg, version in sorted(wanted.items()):
        got = have.get(pkg)
        if got is None:
            problems.append(f"{pkg} missing (want {version})")
        elif got != version:
            problems.append(f"{pkg} {got} (want {version})")
    if problems:
        raise DeviceError(f"{_where(name, host)} runtime does not match target {target.name}: "
                          f"{'; '.join(problems)}; {fix}")


def provision(t: Probed, target: TargetSpec) -> dict[str, Any]:
    """Create ``dirname(dirname(python))`` as a venv and pip-install the pinned packages there.

    Idempotent: when the probe already shows every pinned version, nothing runs. The caller holds
    the device lock (two provisions must not run pip into one venv at once).
    """
    py = target.transport.python
    if target.transport.kind == "local" and not os.path.isabs(os.path.expanduser(py)):
        return {"host": t.executor.name, "changed": False,
                "note": "local target runs with this interpreter; install its packages here"}
    if not posixpath.isabs(py) or posixpath.basename(posixpath.dirname(py)) != "bin":
        raise DeviceError(f"target {target.name}: transport.python {py!r} must be <venv>/bin/python to provision")
    venv = posixpath.dirname(posixpath.dirname(py))
    before = t.probe()
    if before.get("arch") != target.arch:
        check_probe(target, before, t.executor.name, t.host)  # raises: pip cannot fix the architecture
    try:
        check_probe(target, before, t.executor.name, t.host)
        return {"host": t.executor.name, "venv": venv, "changed": False, "packages": before.get("packages", {})}
    except DeviceError:
        pass  # something is missing or differs: installing it is exactly what follows
    timeout = target.transport.command_timeout_s
    pins = " ".join(q(f"{name}=={version}") for name, version in sorted(target.runtime.packages.items()))
    index = f"--index-url {q(target.runtime.index_url)} " if target.runtime.index_url else ""
    mk = t.executor.run(f"[ -x {q(py)} ] || python3 -m venv {q(venv)}", timeout)
    if mk.rc != 0:
        raise DeviceError(f"{t.executor.name}: cannot create venv {venv}: {mk.tail()}; "
                          "install python3-venv on the device")
    if pins:
        # "--" ends pip's options: whatever a pin holds, pip reads it as a requirement, never as an option.
        pip = with_deadline(f"{q(py)} -m pip install --disable-pip-version-check --no-input {index}-- {pins}", timeout)
        r = t.executor.run(pip, timeout + 15)
        if r.rc != 0:
            raise DeviceError(f"{t.executor.name}: pip install into {venv} failed: {r.tail()}; "
                              "check the device can reach the package index (runtime.index_url)")
    after = t.probe()
    check_probe(target, after, t.executor.name, t.host)
    return {"host": t.executor.name, "venv": venv, "changed": True, "packages": after.get("packages", {})}
