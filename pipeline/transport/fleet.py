"""Fleet helper: run a function for every host of a target, a bounded number at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from pipeline.errors import EdgeshipError
from pipeline.spec import Host, TargetSpec

R = TypeVar("R")


def for_each_host(target: TargetSpec, fn: Callable[[Host | None], R], parallel: int | None = None,
                  *, hosts: list[Host] | None = None) -> dict[str, R | EdgeshipError]:
    """``{host name: fn(host)}``, or the EdgeshipError it raised, for every host of ``target``.

    ``fn`` receives the :class:`Host` and typically does ``with open_transport(target, host) as t:``
    so each host has its own connection. At most ``parallel`` (default ``transport.parallel``)
    hosts run at once. Only EdgeshipError (DeviceError...) is collected per host, so one dead device
    does not stop the fleet; any other exception is a bug and propagates. ``hosts`` restricts the
    run to some hosts. A local target is a fleet of one: ``fn(None)``, keyed by the target's name.
    """
    selected: list[Host | None]
    if target.transport.kind == "ssh":
        selected = list(hosts if hosts is not None else target.transport.hosts)
    else:
        selected = [None]
    width = max(1, min(parallel or target.transport.parallel, len(selected) or 1))

    def _one(host: Host | None) -> R | EdgeshipError:
        try:
            return fn(host)
        except EdgeshipError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=width, thread_name_prefix=f"fleet-{target.name}") as pool:
        futures = {(h.name if h is not None else target.name): pool.submit(_one, h) for h in selected}
        return {name: f.result() for name, f in futures.items()}
