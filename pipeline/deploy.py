"""Deploy + validate: ship a release to every device of a target, measure there, gate, roll back.

Per device, under the device's lock: probe (refuse a mismatched architecture or runtime), upload
the release (content-addressed: nothing moves if it is already there), switch the spec's
``current``, run the agent, gate each run, and switch back to the spec's previous good release
when the gate fails (``require="all"``, the default) or when no run passed (``require="any"``,
``deploy --keep-passing``). Releases are kept per spec on the device, so another spec's release
is never touched. The gate's outcome is recorded on the device (``devices releases``, ``rollback``).
Devices of a fleet run in parallel (bounded by ``transport.parallel``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.build import BuildResult, build
from pipeline.cache import Cache, sha256_file
from pipeline.errors import BadInput, DeviceError, EdgeshipError, Interrupted
from pipeline.spec import Host, PipelineSpec, TargetSpec
from pipeline.validate.gate import budget_pp, check_run, combine, run_row
from pipeline.validate.paired import attach_drop_intervals
from pipeline.validate.recommend import recommend, recommend_across
from pipeline.validate.report import RESULTS_SCHEMA, size

if TYPE_CHECKING:
    from pipeline.transport import Transport
    from pipeline.transport.fleet import Rollout

LOCK_WAIT_S = 600.0
#: ``deploy --require``: ``all`` runs must pass for the release to stay (today's rule), or ``any``
#: one (``--keep-passing``: ship what passed, ``recommended`` names the run to use).
REQUIRE = ("all", "any")


def deploy(spec: PipelineSpec, target: TargetSpec, out_dir: Path, *, cache: Cache | None = None,
           hosts: list[str] | None = None, rollback_on_fail: bool = True, require: str = "all",
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check the devices, build (cached), deploy to every host of ``target``, validate, gate. Returns
    the results doc."""
    from pipeline.transport.preflight import check_devices

    check_devices(target, _select_hosts(target, hosts), log)
    built = build(spec, target, out_dir, cache=cache, log=log)
    return deploy_release(built, hosts=hosts, rollback_on_fail=rollback_on_fail, require=require, log=log)


def deploy_release(built: BuildResult, *, hosts: list[str] | None = None, rollback_on_fail: bool = True,
                   require: str = "all", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Ship ``built`` to the selected hosts (all of the target's by default), measure, gate, report.

    A fleet stops starting hosts once ``transport.max_failures`` of them failed (unreachable, or
    gate failed); on Ctrl-C/SIGTERM every device's agent is stopped and its previous release made
    current again before :class:`~pipeline.errors.Interrupted` is raised.
    """
    from pipeline.transport.fleet import Rollout, for_each_host

    target = built.target
    rollout = Rollout()
    t0 = time.perf_counter()
    if require not in REQUIRE:
        raise BadInput(f"--require must be one of {', '.join(REQUIRE)}, not {require!r}")
    keep = "never" if not rollback_on_fail else require
    outcomes = for_each_host(target, lambda h: _deploy_one(built, h, keep, log, rollout),
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
    versions: dict[str, Any] = {}

    def one(host: Host | None) -> dict[str, Any]:
        with open_transport(target, host) as tr, tr.lock(wait_s=LOCK_WAIT_S), \
                rollout.stoppable(tr.name, tr.stop_agent):
            tr.cancel = rollout.cancelled
            name = tr.name
            current = tr.verify_current(spec.name)  # the bytes measured are the bytes that were verified
            manifest = json.loads(tr.read_current_manifest(spec.name))
            _same_spec(spec, manifest, f"{name}: release {current[:12]}")
            try:
                raw = _measure(tr, spec.name, len(manifest["runs"]), log)
            except EdgeshipError:
                if rollout.cancelled.is_set():
                    raise Interrupted(f"{name}: validation stopped, {current[:12]} still current") from None
                raise
        versions.update(manifest["provenance"].get("tools") or {})
        return _device_result(spec, target, name, manifest, raw, {"release_id": current, "bytes_moved": 0},
                              _host_eval_dir(out_dir, manifest))

    outcomes = for_each_host(target, one, hosts=_select_hosts(target, hosts), rollout=rollout)
    wrong = next((o for o in outcomes.values() if isinstance(o, BadInput)), None)
    if wrong is not None:
        raise wrong  # another spec's release: nothing was measured, and no report pretends otherwise
    devices = [_device_outcome(n, o) for n, o in outcomes.items()]
    gate = combine([d["gate"] for d in devices])
    ref = devices[0].get("reference", {}) if devices else {}
    return {"schema": RESULTS_SCHEMA, "spec": spec.name, "target": target.name, "release_id": None,
            "reference": ref, "budget_pp": budget_pp(spec, target),
            "accuracy_decision": spec.accuracy.decision, "versions": versions, "devices": devices,
            "runs": devices[0]["runs"] if len(devices) == 1 else [], "gate": gate,
            "recommended": recommend_across(devices, spec.deploy.recommend)}


def _same_spec(spec: PipelineSpec, manifest: dict[str, Any], where: str) -> None:
    """Refuse to gate a release against a spec it was not built from (name, or the spec file's sha256)."""
    built = (manifest.get("provenance") or {}).get("spec") or {}
    name, sha = manifest.get("name") or built.get("name"), built.get("sha256")
    mine = sha256_file(spec.source_path) if spec.source_path else None
    if name != spec.name:
        raise BadInput(f"{where} was built from spec {name!r}, not {spec.name!r}; deploy {spec.name} first")
    if sha and mine and sha != mine:
        raise BadInput(f"{where} was built from another version of spec {spec.name} ({built.get('path')}, sha256 "
                       f"{sha[:12]}; {spec.source_path} is {mine[:12]}); deploy this spec first to validate it")


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


def _deploy_one(built: BuildResult, host: Host | None, keep: str, log: Callable[[str], None],
                rollout: "Rollout") -> dict[str, Any]:
    from pipeline.transport import open_transport

    started = time.time()
    with open_transport(built.target, host) as tr:
        tr.cancel = rollout.cancelled
        with tr.lock(wait_s=LOCK_WAIT_S), rollout.stoppable(tr.name, tr.stop_agent):
            before = tr.current(built.spec.name)
            try:
                result = _ship_and_gate(built, tr, keep, log)
            except EdgeshipError:
                if rollout.cancelled.is_set():
                    raise _restore(tr, built.spec.name, before, log) from None
                raise
    result["started_at"], result["finished_at"] = round(started, 3), round(time.time(), 3)
    return result


def _restore(tr: "Transport", spec: str, before: str | None, log: Callable[[str], None]) -> Interrupted:
    """After an interrupt: no agent left running, and the spec's release that was current is current
    again (none, when this was its first: an unvalidated release is not left current)."""
    stopped = tr.stop_agent()
    now = tr.current(spec)
    if now == before:
        what = f"{before[:12] if before else 'nothing'} still current"
    elif before is not None:
        tr.rollback(before, spec)
        what = f"rolled back to {before[:12]}"
    else:
        tr.clear(spec)
        what = f"{str(now)[:12]} is no longer current, never validated (there is no earlier release of {spec})"
    msg = f"{tr.name}: {'agent stopped, ' if stopped else ''}{what}"
    log(msg)
    return Interrupted(msg)


def _ship_and_gate(built: BuildResult, tr: "Transport", keep: str,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Probe, upload and switch, measure, gate; roll back a failed gate (``keep``: all | any |
    never, see :func:`_settle`). The caller holds the lock."""
    target, spec, name = built.target, built.spec, tr.name
    probe = tr.probe()
    tr.check(target, probe)
    log(f"{name}: {probe.get('arch')} {probe.get('os')}, python {probe.get('python')}, "
        f"{probe.get('disk_free_mb')} MB free")
    dep = tr.deploy(built.release_dir, built.release_id)
    repaired = len(dep.get("repaired_files") or [])
    log(f"{name}: release {built.release_id[:12]} {'uploaded' if dep.get('changed') else 'already there'}"
        f", {size(dep.get('bytes_moved', 0))} moved" + (f", {repaired} damaged files of older releases repaired"
                                                         if repaired else ""))
    raw = _measure(tr, spec.name, len(built.manifest["runs"]), log)
    _log_device_builds(name, raw, log)
    result = _device_result(spec, target, name, built.manifest, raw, dep,
                            built.release_dir / built.manifest["agent"]["eval_dir"])
    result["probe"] = probe
    _settle(built, tr, result, keep, log)
    return result


def _settle(built: BuildResult, tr: "Transport", result: dict[str, Any], keep: str,
            log: Callable[[str], None]) -> None:
    """Keep the release, or put the spec's previous good release back (none: the spec has no
    current release); then record the gate's outcome on the device.

    ``keep``: ``all`` keeps it when every run passed, ``any`` when at least one did (the results'
    ``recommended`` names which to use), ``never`` (``--no-rollback``) always.
    """
    spec, rid, name = built.spec.name, built.release_id, tr.name
    passed = sum(1 for r in result["runs"] if r["gate"]["passed"])
    kept = result["gate"]["passed"] or keep == "never" or (keep == "any" and passed > 0)
    result["kept"] = kept
    if not kept:
        good = _good_previous(tr, spec, rid)
        if good is not None:
            tr.rollback(good, spec)
            result["rolled_back"], result["rolled_back_to"] = True, good
            log(f"{name}: gate failed, rolled back to {good[:12]} (the previous good release of {spec})")
        else:
            tr.clear(spec)
            result["rolled_back"], result["cleared"] = False, True
            log(f"{name}: gate failed and {spec} has no earlier good release: nothing of {spec} is current now")
    elif not result["gate"]["passed"]:
        log(f"{name}: gate failed for {len(result['runs']) - passed} of {len(result['runs'])} runs; release "
            f"{rid[:12]} kept" + (f", recommended run {result['recommended']['run']}" if result.get("recommended") else ""))
    manifest_file = built.release_dir / "manifest.json"
    tr.record(spec, rid, {
        "gate": "passed" if result["gate"]["passed"] else "failed", "runs_passed": passed,
        "runs": len(result["runs"]), "kept": kept, "at": round(time.time(), 3),
        "built_at": round(manifest_file.stat().st_mtime, 3) if manifest_file.exists() else None,
        "recommended": (result.get("recommended") or {}).get("run"), "reasons": result["gate"]["reasons"][:3]})


def _good_previous(tr: "Transport", spec: str, rid: str) -> str | None:
    """The spec's most recently current release other than ``rid`` that did not fail its gate
    (kept ones count as good; one without a record was current before outcomes were recorded)."""
    for d in tr.slot(spec)["details"]:
        gate = d.get("gate") or {}
        if d["id"] != rid and d.get("last_current") is not None and (gate.get("gate") != "failed" or gate.get("kept")):
            return str(d["id"])
    return None


def _measure(tr: "Transport", spec: str, runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The agent's run over the release, announced before and timed after: the agent prints one
    JSON document at the end, so there is nothing finer to show while it measures."""
    from pipeline.output import step

    t0 = time.perf_counter()
    what = f"{runs} run{'' if runs == 1 else 's'}"
    with step(f"{tr.name}: measuring {what}", announce_after_s=0.0):
        raw = tr.run_agent(["run", "--release", "."], timeout_s=tr.target.transport.command_timeout_s, spec=spec)
    log(f"{tr.name}: {what} measured in {time.perf_counter() - t0:.2f}s")
    return raw


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
    from pipeline.metrics import spec_metric
    from pipeline.validate.scoring import read_host_eval, score_rows

    reference = manifest["provenance"]["reference"]
    metas = {r["id"]: r for r in manifest["runs"]}
    by_id = {r["id"]: r for r in raw.get("results", [])}
    rows = [run_row(by_id.get(rid, {"error": "the agent returned no result for this run"}), meta, reference,
                    spec.evaluation.metric_name, target.hardware.tdp_w) for rid, meta in metas.items()]
    if eval_dir is not None:  # paired with fp32 on the same samples: the drop's exact interval
        attach_drop_intervals(rows, raw, eval_dir, spec.evaluation.metric_name, spec.evaluation.tie_margin)
    # the spec's metric on each run's raw outputs, against the labels and fp32 outputs kept on the host
    host = read_host_eval(eval_dir.parent if eval_dir is not None else None, manifest.get("release_id"))
    score_rows(rows, raw, spec_metric(spec), reference["accuracy"], host, spec.evaluation.tie_margin,
               slow_intervals=spec.accuracy.decision == "upper_bound")
    gates = [check_run(row, spec, target) for row in rows]
    return {"device": name, "deploy": dep, "device_info": raw.get("device"), "conditions": raw.get("conditions"),
            "runs": rows, "reference": reference, "gate": combine(gates),
            "recommended": recommend(rows, spec.deploy.recommend), "rolled_back": False, "error": None}


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
        # The run to use (deploy.recommend) among those that passed, on every device; null if none did.
        "recommended": recommend_across(devices, built.spec.deploy.recommend),
        "deploy_seconds": round(seconds, 2),
    }
