"""Check the devices before the build: a wrong host, key or device surfaces in a second, not after a
two-minute build.

Each selected SSH host is opened and probed exactly as the deploy will do it (``open_transport``,
``Transport.probe`` and ``check``: reachability, the host key against edgeship's known_hosts with
nothing auto-accepted, the key file, the device's python and runtime), so there is one
implementation of each check (a shipped example's stand-in host, ``placeholder: true``, is refused
there before any connection is tried).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipeline.errors import BadInput, DeviceError, EdgeshipError
from pipeline.spec import Host, TargetSpec


def _check_host(target: TargetSpec, host: Host) -> EdgeshipError | None:
    from pipeline.transport import open_transport

    try:
        with open_transport(target, host) as tr:
            tr.check(target, tr.probe())
    except EdgeshipError as exc:
        return exc
    return None


def check_devices(target: TargetSpec, hosts: list[Host] | None, log: Callable[[str], None]) -> None:
    """Raise when the build would be wasted: a target mistake (exit 2) on any host, or every host
    failing (exit 1). A fleet with some hosts down goes on: the rollout counts them as failed."""
    if target.transport.kind != "ssh":
        return
    chosen = hosts or target.transport.hosts
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(chosen), target.transport.parallel)) as pool:
        errors = [e for e in pool.map(lambda h: _check_host(target, h), chosen) if e is not None]
    for e in errors:
        if isinstance(e, BadInput):
            raise e
    if errors and len(errors) == len(chosen):
        if len(errors) == 1:
            raise errors[0]
        raise DeviceError(f"no host of {target.name} is ready: " + "; ".join(str(e) for e in errors[:3]))
    for e in errors:
        log(f"device check: {e} (the other hosts go on)")
    log(f"device check: {len(chosen) - len(errors)} of {len(chosen)} hosts ready ({time.perf_counter() - t0:.1f} s)")
