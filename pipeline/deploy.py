"""Deploy + validate: ship a release to every device of a target, measure there, gate, roll back.

Per device, under the device's lock: probe (refuse a mismatched architecture or runtime), upload
the release (content-addressed: nothing moves if it is already there), switch ``current``, run
the agent, gate its numbers, and switch back to the previous release when the gate fails.
Devices of a fleet run in parallel (bounded by ``transport.parallel``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.build import BuildResult, build
from pipeline.cache import Cache
from pipeline.errors import DeviceError, EdgeshipError, Interrupted
from pipeline.spec import Host, PipelineSpec, TargetSpec
from pipeline.validate.gate import budget_pp, check_run, combine, run_row
from pipeline.validate.paired import attach_drop_intervals
from pipeline.validate.report import RESULTS_SCHEMA

if TYPE_CHECKING:
    from pipeline.transport import Transport
    from pipeline.transport.fleet import Rollout

LOCK_WAIT_S = 600.0


def deploy(spec: PipelineSpec, target: TargetSpec, out_dir: Path, *, cache: Cache | None = None,
           hosts: list[str] | None = None, rollback_on_fail: bool = True,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (cached), deploy to every host of ``target``, validate, gate. Returns the results doc."""
    built = build(spec, target, out_dir, cache=cache, log=log)
    return deploy_release(built, hosts=hosts, rollback_on_fail=rollback_on_fail, log=log)


def deploy_release(built: BuildResult, *, hosts: list[str] | None = None, rollback_on_fail: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Ship ``built`` to the selected hosts (all of the target's by default), measure, gate, report.

    A fleet stops starting hosts once ``transport.max_failures`` of them failed (unreachable, or
    gate failed); on Ctrl-C/SIGTERM every device's agent is stopped and its previous release made
    current again before :class:`~pipeline.errors.Interrupted` is raised.
    """
    from pipeline.transport.fleet import Rollout, for_each_host

    target = built.target
    rollout = Rollout()
    t0 = time.perf_counter()
    outcomes = for_each_host(target, lambda h: _deploy_one(built, h, rollback_on_fail, log, rollout),
                             hosts=_select_hosts(target, hosts), failed=_failed, rollout=rollout)
    devices = [_device_outcome(name, out) for name, out in outcomes.items()]
    if len(devices) > 1:
        log(_fleet_summary(target, devices))
    return _results(built, devices, time.perf_counter() - t0)


def _failed(outcome: Any) -> bool:
    """A host counts against ``transport.max_failures`` when it could not be deployed or failed its gate."""
    return isinstance(outcome, BaseException) or not outcome["gate"]["passed"]


def _device_outcome(name: str, out: Any) -> dict[str, Any]:
    """A device's entry in results.json; errors (and hosts never started) become entries too."""
    from pipeline.transport.fleet import NotStarted

    if not isinstance(out, BaseException):
        return {**out, "status": "passed" if out["gate"]["passed"] else "failed"}
    return {"device": name, "error": str(out), "runs": [], "status": "not-started" if isinstance(out, NotStarted)
            else "error", "gate": {"passed": False, "reasons": [f"{name}: {out}" if not str(out).startswith(name)
                                                               else str(out)]}}


def _fleet_summary(target: TargetSpec, devices: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    stopped = counts.get("not-started", 0)
    return f"fleet {target.name}: {text}" + (
        f" (rollout stopped at transport.max_failures: {target.transport.max_failures})" if stopped else "")


def validate_current(spec: PipelineSpec, target: TargetSpec, out_dir: Path, *, hosts: list[str] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-measure what is deployed now (no build, no upload), gate it against the spec and target."""
    from pipeline.transport import open_transport
    from pipeline.transport.fleet import Rollout, for_each_host

    rollout = Rollout()

    def one(host: Host | None) -> dict[str, Any]:
        with open_transport(target, host) as tr, tr.lock(wait_s=LOCK_WAIT_S), \
                rollout.stoppable(tr.name, tr.stop_agent):
            tr.cancel = rollout.cancelled
            name = tr.name
            current = tr.verify_current()  # the bytes measured are the bytes that were verified
            try:
                raw = tr.run_agent(["run", "--release", "."], timeout_s=target.transport.command_timeout_s)
            except EdgeshipError:
                if rollout.cancelled.is_set():
                    raise Interrupted(f"{name}: validation stopped, {current[:12]} still current") from None
                raise
            manifest = json.loads(tr.read_current_manifest())
        versions.update(manifest["provenance"].get("tools") or {})
        return _device_result(spec, target, name, manifest, raw, {"release_id": current, "bytes_moved": 0},
                              _host_eval_dir(out_dir, manifest))

    outcomes = for_each_host(target, one, hosts=_select_hosts(target, hosts), rollout=rollout)
    devices = [_device_outcome(n, o) for n, o in outcomes.items()]
    gate = combine([d["gate"] for d in devices])
    ref = devices[0].get("reference", {}) if devices else {}
    return {"schema": RESULTS_SCHEMA, "spec": spec.name, "target": target.name, "release_id": None,
            "reference": ref, "budget_pp": budget_pp(spec, target),
            "accuracy_decision": spec.accuracy.decision, "versions": versions, "devices": devices,
            "runs": devices[0]["runs"] if len(devices) == 1 else [], "gate": gate}


def _host_eval_dir(out_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """The evaluation data of the release the device runs, where this host built that same release
    (``out_dir/release``): the runs' drop intervals are paired on it. None when it was built elsewhere."""
    local = out_dir / "release" / "manifest.json"
    try:
        same = json.loads(local.read_text(encoding="utf-8")).get("release_id") == manifest.get("release_id")
    except (OSError, ValueError):
        return None
    return out_dir / "release" / manifest["agent"]["eval_dir"] if same else None


def _select_hosts(target: TargetSpec, names: list[str] | None) -> list[Host] | None:
    if not names:
        return None
    known = {h.name: h for h in target.transport.hosts}
    missing = [n for n in names if n not in known]
    if missing:
        raise DeviceError(f"target {target.name} has no host named {', '.join(missing)}; "
                          f"hosts: {', '.join(known) or 'none'}")
    return [known[n] for n in names]


def _deploy_one(built: BuildResult, host: Host | None, rollback_on_fail: bool, log: Callable[[str], None],
                rollout: "Rollout") -> dict[str, Any]:
    from pipeline.transport import open_transport

    started = time.time()
    with open_transport(built.target, host) as tr:
        tr.cancel = rollout.cancelled
        with tr.lock(wait_s=LOCK_WAIT_S), rollout.stoppable(tr.name, tr.stop_agent):
            before = tr.current()
            try:
                result = _ship_and_gate(built, tr, rollback_on_fail, log)
            except EdgeshipError:
                if rollout.cancelled.is_set():
                    raise _restore(tr, before, log) from None
                raise
    result["started_at"], result["finished_at"] = round(started, 3), round(time.time(), 3)
    return result


def _restore(tr: "Transport", before: str | None, log: Callable[[str], None]) -> Interrupted:
    """After an interrupt: no agent left running, and the release that was current is current again."""
    stopped = tr.stop_agent()
    now = tr.current()
    if now == before:
        what = f"{before[:12] if before else 'nothing'} still current"
    elif before is not None:
        tr.rollback(before)
        what = f"rolled back to {before[:12]}"
    else:
        what = f"{str(now)[:12]} stays current, never validated (there is no previous release)"
    msg = f"{tr.name}: {'agent stopped, ' if stopped else ''}{what}"
    log(msg)
    return Interrupted(msg)


def _ship_and_gate(built: BuildResult, tr: "Transport", rollback_on_fail: bool,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Probe, upload and switch, measure, gate; roll back a failed gate. The caller holds the lock."""
    target, spec, name = built.target, built.spec, tr.name
    probe = tr.probe()
    tr.check(target, probe)
    log(f"{name}: {probe.get('arch')} {probe.get('os')}, python {probe.get('python')}, "
        f"{probe.get('disk_free_mb')} MB free")
    dep = tr.deploy(built.release_dir, built.release_id)
    repaired = len(dep.get("repaired_files") or [])
    log(f"{name}: release {built.release_id[:12]} {'uploaded' if dep.get('changed') else 'already there'}"
        f", {dep.get('bytes_moved', 0)} bytes moved" + (f", {repaired} damaged files of older releases repaired"
                                                         if repaired else ""))
    raw = tr.run_agent(["run", "--release", "."], timeout_s=target.transport.command_timeout_s)
    _log_device_builds(name, raw, log)
    result = _device_result(spec, target, name, built.manifest, raw, dep,
                            built.release_dir / built.manifest["agent"]["eval_dir"])
    result["probe"] = probe
    if not result["gate"]["passed"] and rollback_on_fail:
        previous = dep.get("previous")
        if previous and previous != built.release_id:
            tr.rollback(previous)
            result["rolled_back"] = True
            result["rolled_back_to"] = previous
            log(f"{name}: gate failed, rolled back to {previous[:12]}")
        else:
            result["rolled_back"] = False
            log(f"{name}: gate failed and there is no previous release to roll back to")
    return result


def _log_device_builds(name: str, raw: dict[str, Any], log: Callable[[str], None]) -> None:
    """One line per artifact built on the device (pipeline/agent/device_build.py): cached or built."""
    for r in raw.get("results", []):
        b = r.get("device_build")
        if b:
            what = "engine cached" if b.get("cached") else f"engine built in {b.get('seconds', 0):.1f}s"
            log(f"{name}: {r['id']}: {what} ({b.get('builder')}, key {str(b.get('key'))[:12]})")


def _device_result(spec: PipelineSpec, target: TargetSpec, name: str, manifest: dict[str, Any],
                   raw: dict[str, Any], dep: dict[str, Any], eval_dir: Path | None = None) -> dict[str, Any]:
    """Rows from the agent's results, each gated; ``eval_dir`` (the release's evaluation data on the
    host) gives each row its paired drop interval first, since accuracy.decision may gate on it."""
    reference = manifest["provenance"]["reference"]
    metas = {r["id"]: r for r in manifest["runs"]}
    by_id = {r["id"]: r for r in raw.get("results", [])}
    rows = [run_row(by_id.get(rid, {"error": "the agent returned no result for this run"}), meta, reference,
                    spec.evaluation.metric, target.hardware.tdp_w) for rid, meta in metas.items()]
    if eval_dir is not None:  # paired with fp32 on the same samples: the drop's exact interval
        attach_drop_intervals(rows, raw, eval_dir, spec.evaluation.metric, spec.evaluation.tie_margin)
    gates = [check_run(row, spec, target) for row in rows]
    return {"device": name, "deploy": dep, "device_info": raw.get("device"), "conditions": raw.get("conditions"),
            "runs": rows, "reference": reference, "gate": combine(gates), "rolled_back": False, "error": None}


def _results(built: BuildResult, devices: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    gate = combine([d["gate"] for d in devices])
    return {
        "schema": RESULTS_SCHEMA,
        "spec": built.spec.name,
        "target": built.target.name,
        "release_id": built.release_id,
        "reference": built.reference_metric,
        "budget_pp": budget_pp(built.spec, built.target),
        "accuracy_decision": built.spec.accuracy.decision,
        "versions": built.manifest["provenance"].get("tools") or {},  # edgeship, git commit, converters
        "model": built.manifest["provenance"]["model"]["analysis"],
        "stages": [{"stage": e.stage, "cached": e.cached, "seconds": round(e.seconds, 3)} for e in built.events],
        "devices": devices,
        # The single-device case, flat, for scripts: the first device's runs.
        "runs": devices[0]["runs"] if devices else [],
        "gate": gate,
        "deploy_seconds": round(seconds, 2),
    }
