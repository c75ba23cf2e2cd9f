"""Fleet helper: run a function for every host of a target, a bounded number at a time.

Two things a rollout shares across its hosts live here, once for every fleet command:
  * the abort threshold (``transport.max_failures``): once that many hosts failed, hosts not yet
    started are not started (those in flight finish);
  * Ctrl-C / SIGTERM: the main thread tells every device's worker (:class:`Rollout`), stops the
    agents that are running, waits for the workers to restore their devices, then raises
    :class:`~pipeline.errors.Interrupted`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator, TypeVar

from pipeline.errors import DeviceError, EdgeshipError, Interrupted
from pipeline.spec import Host, TargetSpec

R = TypeVar("R")
#: How long an interrupted rollout waits for its workers to put their devices back.
RESTORE_S = 120.0


class NotStarted(DeviceError):
    """A host the rollout never reached: the abort threshold stopped it first."""


class Rollout:
    """What the workers of one fleet run share: the interrupt flag and how to stop each agent."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._stops: dict[str, Callable[[], object]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stoppable(self, name: str, stop: Callable[[], object]) -> Iterator[None]:
        """While the block runs, an interrupt calls ``stop()`` (e.g. kill the device's agent)."""
        with self._lock:
            self._stops[name] = stop
        try:
            yield
        finally:
            with self._lock:
                self._stops.pop(name, None)

    def interrupt(self) -> None:
        """Flag the interrupt, then stop what runs on the devices (from the main thread)."""
        self.cancelled.set()
        with self._lock:
            stops = list(self._stops.values())
        for stop in stops:
            try:
                stop()
            except (EdgeshipError, OSError):
                pass  # that device's worker restores it when its own command returns


def failure_limit(value: int | str | None, hosts: int) -> int | None:
    """``transport.max_failures`` as a number of hosts: ``3`` -> 3, ``"30%"`` of 10 -> 3 (rounded up)."""
    if value is None:
        return None
    if isinstance(value, str):
        return max(1, math.ceil(float(value.rstrip("%")) * hosts / 100.0 - 1e-9))
    return int(value)


def for_each_host(target: TargetSpec, fn: Callable[[Host | None], R], parallel: int | None = None,
                  *, hosts: list[Host] | None = None, failed: Callable[[R | EdgeshipError], bool] | None = None,
                  rollout: Rollout | None = None) -> dict[str, R | EdgeshipError]:
    """``{host name: fn(host)}``, or the EdgeshipError it raised, for every host of ``target``.

    ``fn`` receives the :class:`Host` and typically does ``with open_transport(target, host) as t:``
    so each host has its own connection. At most ``parallel`` (default ``transport.parallel``)
    hosts run at once. Only EdgeshipError (DeviceError...) is collected per host, so one dead device
    does not stop the fleet; any other exception is a bug and propagates. ``hosts`` restricts the
    run to some hosts. A local target is a fleet of one: ``fn(None)``, keyed by the target's name.

    With ``failed`` (which outcomes count as failures), ``transport.max_failures`` stops the
    rollout: hosts not started by then get :class:`NotStarted`. With ``rollout``, Ctrl-C calls
    :meth:`Rollout.interrupt`, waits for the workers and raises Interrupted naming what they did.
    Results come back in host order.
    """
    selected: list[Host | None]
    if target.transport.kind == "ssh":
        selected = list(hosts if hosts is not None else target.transport.hosts)
    else:
        selected = [None]
    width = max(1, min(parallel or target.transport.parallel, len(selected) or 1))
    limit = failure_limit(target.transport.max_failures, len(selected)) if failed is not None else None

    def key(host: Host | None) -> str:
        return host.name if host is not None else target.name

    def _one(host: Host | None) -> R | EdgeshipError:
        try:
            return fn(host)
        except EdgeshipError as exc:
            return exc

    results: dict[str, R | EdgeshipError] = {}
    running: dict[Future[R | EdgeshipError], str] = {}
    queue = list(selected)
    failures = 0
    pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix=f"fleet-{target.name}")
    try:
        while queue or running:
            while queue and len(running) < width and (limit is None or failures < limit):
                host = queue.pop(0)
                running[pool.submit(_one, host)] = key(host)
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                results[name] = fut.result()
                failures += int(failed is not None and failed(results[name]))
    except KeyboardInterrupt:
        raise _interrupted(rollout, running, results) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for host in queue:
        results[key(host)] = NotStarted(
            f"{key(host)}: not started: the rollout stopped after {failures} of {len(selected)} hosts failed "
            f"(transport.max_failures: {target.transport.max_failures})")
    return {key(h): results[key(h)] for h in selected}


def _interrupted(rollout: Rollout | None, running: dict[Future, str], results: dict[str, object]) -> Interrupted:
    """Stop the devices' agents, let the workers roll back, and say what each device did."""
    if rollout is not None:
        rollout.interrupt()
        done, _ = wait(list(running), timeout=RESTORE_S)
        for fut in done:
            results[running[fut]] = fut.result()
    said = [str(r) for r in results.values() if isinstance(r, Interrupted)]
    pending = [name for fut, name in running.items() if not fut.done()]
    if pending:
        said.append(f"{', '.join(pending)}: still restoring after {RESTORE_S:g} s; check with `edgeship devices releases`")
    return Interrupted("; ".join(said))
