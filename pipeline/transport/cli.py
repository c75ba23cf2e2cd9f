"""``edgeship devices ...`` and ``edgeship rollback``: typer commands over the transport layer.

Mounted by pipeline/cli.py (``app.add_typer(devices_app, name="devices")``,
``app.command("rollback")(rollback)``). Errors are raised as DeviceError/SpecError; the main CLI
turns them into one line and an exit code. A fleet command reports every host, then fails if any
host failed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Callable, Optional

import typer

from pipeline.errors import BadInput, DeviceError, EdgeshipError
from pipeline.spec import Host, TargetSpec, list_target_names, load_target

devices_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="Trust, probe and provision devices; list their releases.")

HostOpt = Annotated[Optional[str], typer.Option("--host", help="Only this host of the target (its name).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _hosts(target: TargetSpec, name: str | None) -> list[Host] | None:
    if name is None:
        return None
    from pipeline.transport.transport import pick_host

    return [pick_host(target, name)]


def _fleet(target: TargetSpec, host: str | None, fn: Callable[[Any], Any], show: Callable[[str, Any], None],
           as_json: bool) -> None:
    """Run ``fn(transport)`` on each host, print each outcome, raise if any host failed."""
    from pipeline.transport import for_each_host, open_transport

    def one(h: Host | None) -> Any:
        with open_transport(target, h) as t:
            return fn(t)

    outcomes = for_each_host(target, one, hosts=_hosts(target, host))
    if len(outcomes) == 1 and not as_json:
        [(name, out)] = outcomes.items()
        if isinstance(out, EdgeshipError):
            raise out  # one device: its own one-line error is the whole story
    if as_json:
        typer.echo(json.dumps({n: (o if not isinstance(o, EdgeshipError) else {"error": str(o)})
                               for n, o in outcomes.items()}, indent=1, default=str))
    failed = []
    for name, out in outcomes.items():
        if isinstance(out, EdgeshipError):
            failed.append(name)
            if not as_json:
                typer.echo(f"{name}: error: {out}", err=True)
        elif not as_json:
            show(name, out)
    if failed:
        raise DeviceError(f"{len(failed)} of {len(outcomes)} hosts of {target.name} failed: {', '.join(failed)}")


@devices_app.command("list")
def list_devices(as_json: JsonOpt = False) -> None:
    """Every target's devices and whether edgeship trusts their host keys (no network)."""
    rows = []
    for name in list_target_names():
        try:
            target = load_target(name)
        except EdgeshipError as exc:
            rows.append({"target": name, "error": str(exc)})
            continue
        if target.transport.kind == "local":
            rows.append({"target": name, "host": "local", "address": target.transport.device_root(target.name), "trusted": "n/a"})
            continue
        from pipeline.transport import hostkeys
        from pipeline.transport.sshconfig import resolve

        known = hostkeys.known_hosts_path(target)
        for h in target.transport.hosts:
            try:
                ep = resolve(target, h)  # the ssh config's alias, user, port and jump hosts
            except EdgeshipError as exc:
                rows.append({"target": name, "error": str(exc)})
                continue
            keys = hostkeys.trusted_keys(known, ep)
            fp = ", ".join(hostkeys.fingerprint(k) for k in keys.values()) or "not trusted"
            rows.append({"target": name, "host": h.name, "address": ep.route(), "trusted": fp})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        if "error" in r:
            typer.echo(f"{r['target']:<18} error: {r['error']}")
        else:
            typer.echo(f"{r['target']:<18} {r['host']:<14} {r['address']:<34} {r['trusted']}")


@devices_app.command("trust")
def trust_cmd(target_name: Annotated[str, typer.Argument(metavar="TARGET")], host: HostOpt = None,
              yes: Annotated[bool, typer.Option("--yes", help="Accept the key shown (you checked it).")] = False,
              fingerprint: Annotated[Optional[str], typer.Option(
                  "--fingerprint", help="Expected SHA256:... fingerprint, obtained on the device itself.")] = None,
              ) -> None:
    """Fetch a device's host key (key exchange only, no login), show it, enrol it when confirmed.

    Check the fingerprint on the device's console: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub
    A host behind jump hosts (ProxyJump) asks for each jump host's key first.
    """
    target = load_target(target_name)
    if target.transport.kind != "ssh":
        raise DeviceError(f"target {target.name} is not reached over SSH; nothing to trust")
    hosts = _hosts(target, host) or target.transport.hosts
    if fingerprint is not None and len(hosts) > 1:
        raise DeviceError(f"target {target.name} has {len(hosts)} hosts and each has its own key; "
                          "give --host with --fingerprint")
    for h in hosts:
        _trust_route(target, h, fingerprint, yes)


def _trust_route(target: TargetSpec, h: Host, fingerprint: str | None, yes: bool) -> None:
    """Confirm and enrol the keys on the way to ``h``: each unknown jump host's, then the host's."""
    from pipeline.transport import hostkeys, sshconnect

    for _ in range(9):  # at most 8 jump hosts (sshconfig) and the host
        ep, jump, key = sshconnect.pending(target, h)
        what = f"{h.name}: jump host {ep.alias} ({ep.address})" if jump else f"{h.name} ({ep.address})"
        confirmed, expected = yes, fingerprint
        if fingerprint is None and not yes:
            fp = hostkeys.fingerprint(key)
            typer.echo(f"{what} presents {key.get_name()} {fp}")
            if not sys.stdin.isatty():
                raise DeviceError(f"{ep.address} presents {fp}; not trusted without confirmation: rerun with "
                                  f"--fingerprint {fp} after checking it on the device, or --yes")
            confirmed = typer.confirm("Is this the key shown on the device itself?", default=False)
            if not confirmed:
                raise DeviceError(f"{ep.address}: key not trusted (declined)")
            expected = fp  # write exactly the key the person just saw
        out = sshconnect.trust(target, h, expected=expected, yes=confirmed)
        typer.echo(f"{what}: {out['status']} {out['key_type']} {out['fingerprint']} "
                   f"in {hostkeys.known_hosts_path(target)}")
        if not jump:
            return
        if fingerprint is not None:  # one --fingerprint confirms one key: the next hop needs its own
            raise DeviceError(f"jump host {ep.alias} is trusted now; rerun `edgeship devices trust {target.name} "
                              f"--host {h.name}` for the next key on the way to {h.name}")


@devices_app.command("probe")
def probe_cmd(target_name: Annotated[str, typer.Argument(metavar="TARGET")], host: HostOpt = None,
              as_json: JsonOpt = False) -> None:
    """What each device is (arch, OS, CPU, memory, disk, python, runtimes) and whether it fits."""
    target = load_target(target_name)

    def fn(t: Any) -> dict[str, Any]:
        p = t.probe()
        try:
            t.check(target, p)
            p["fits_target"] = True
        except DeviceError as exc:
            p["fits_target"] = str(exc)
        return p

    def show(name: str, p: dict[str, Any]) -> None:
        rt = ", ".join(f"{k} {v}" for k, v in sorted((p.get("runtimes") or {}).items())) or "none"
        jet = p.get("jetson") or {}
        typer.echo(f"{name}: {p['arch']} {p['os']}, {p.get('cores')} cores {p.get('cpu')}, "
                   f"{p.get('memory_mb')} MB RAM, {p.get('disk_free_mb')} MB free, python {p.get('python')}")
        typer.echo(f"  runtimes: {rt}" + (f"; L4T {jet.get('l4t')} TensorRT {jet.get('tensorrt')}" if jet else ""))
        fits = p["fits_target"]
        typer.echo(f"  fits {target.name}: " + ("yes" if fits is True else f"no: {fits}"))

    _fleet(target, host, fn, show, as_json)


@devices_app.command("doctor")
def doctor_cmd(target_name: Annotated[str, typer.Argument(metavar="TARGET")], host: HostOpt = None,
               as_json: JsonOpt = False) -> None:
    """Check each board for TensorRT, the CUDA driver and GPU, a power sensor and its clocks; one
    line per check saying what is missing (exit 1 when something is)."""
    from pipeline.transport.doctor import run_doctor

    target = load_target(target_name)
    missing: list[str] = []

    def show(name: str, report: dict[str, Any]) -> None:
        for c in report["checks"]:
            typer.echo(f"{name}: {c['check']:<8} {'ok     ' if c['ok'] else 'MISSING'} {c['detail']}")

    def fn(t: Any) -> dict[str, Any]:
        report = run_doctor(t)
        missing.extend(f"{t.name} {c['check']}" for c in report["checks"] if not c["ok"])
        return report

    _fleet(target, host, fn, show, as_json)
    if missing:
        raise DeviceError(f"missing on {target.name}: {', '.join(missing)}")


@devices_app.command("provision")
def provision_cmd(target_name: Annotated[str, typer.Argument(metavar="TARGET")], host: HostOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Create the device's runtime venv with the target's pinned packages (idempotent)."""
    target = load_target(target_name)

    def show(name: str, out: dict[str, Any]) -> None:
        pk = ", ".join(f"{k} {v}" for k, v in sorted((out.get("packages") or {}).items()))
        typer.echo(f"{name}: {'provisioned' if out.get('changed') else 'already provisioned'} "
                   f"{out.get('venv', '')} {pk} {out.get('note', '')}".rstrip())

    _fleet(target, host, lambda t: t.provision(target), show, as_json)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _outcome(gate: dict[str, Any] | None) -> str:
    """The gate outcome recorded on the device, in a few words."""
    if not gate:
        return "gate not recorded"
    if gate.get("gate") == "passed":
        return f"passed ({gate.get('runs_passed')}/{gate.get('runs')} runs)"
    return (f"FAILED ({gate.get('runs_passed')}/{gate.get('runs')} runs passed), "
            + ("kept" if gate.get("kept") else "rolled back"))


@devices_app.command("releases")
def releases_cmd(target_name: Annotated[str, typer.Argument(metavar="TARGET")], host: HostOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Releases on each device by spec, most recent first: current (*), previous (-), build time and
    the gate outcome of the deploy that shipped each."""
    target = load_target(target_name)

    def show(name: str, specs: dict[str, dict[str, Any]]) -> None:
        typer.echo(f"{name}:" + ("" if any(st["details"] for st in specs.values()) else " no releases"))
        for spec, st in specs.items():
            if not st["details"]:
                continue
            typer.echo(f"  {spec}" + ("" if st["current"] else " (nothing current)"))
            for d in st["details"]:
                mark = "*" if d["id"] == st["current"] else "-" if d["id"] == st["previous"] else " "
                gate = d.get("gate") or {}
                typer.echo(f"    {mark} {d['id'][:16]:<16} {d['bytes'] / 2**20:8.1f} MiB  built {_when(gate.get('built_at'))}"
                           f"  last current {_when(d['last_current'])}  {_outcome(d.get('gate'))}")

    _fleet(target, host, lambda t: t.state(), show, as_json)


def _checked_rollback(t: Any, spec: str | None, to: str | None, force: bool, may_ask: bool) -> str | None:
    """Roll ``spec`` back on one device, under its lock; a release whose gate failed needs --force
    (or, on a terminal with one device, a yes to the question)."""
    with t.lock(t.lock_wait_s):
        slot = t.slot(spec)
        dest = to or slot["previous"]
        gate = next((d.get("gate") for d in slot["details"] if d["id"] == dest), None) or {}
        if dest and gate.get("gate") == "failed":
            why = "; ".join(gate.get("reasons") or []) or "no reason recorded"
            warning = (f"{t.name}: release {dest[:12]} of {slot['spec']} failed its gate on {_when(gate.get('at'))} "
                       f"({_outcome(gate)}: {why})")
            if force:
                typer.echo(f"warning: {warning}; switching to it (--force)", err=True)
            elif not may_ask:
                raise BadInput(f"{warning}; not switched: rerun with --force to switch to it anyway")
            else:
                typer.echo(f"warning: {warning}", err=True)
                if not typer.confirm("Switch to it anyway?", default=False):
                    raise BadInput(f"{t.name}: rollback to {dest[:12]} declined; nothing was switched")
        return t.rollback(dest, slot["spec"])


def rollback(target_name: Annotated[str, typer.Argument(metavar="TARGET")],
             spec: Annotated[Optional[str], typer.Option("--spec", help="Which spec's releases (the spec's name; "
                                                         "default: the only spec on the device).")] = None,
             to: Annotated[Optional[str], typer.Option("--to", help="Release id (default: the previous one).")] = None,
             force: Annotated[bool, typer.Option("--force", help="Switch even to a release whose gate failed.")] = False,
             host: HostOpt = None) -> None:
    """Switch a spec's current release on each device of TARGET back to its previous one (or --to ID).

    Switching to a release whose gate failed is refused without --force: on a terminal with one
    device you are asked; otherwise (scripts, CI, fleets) the command stops with exit 2, since an
    unattended switch to a release known to fail its limits is almost always a mistake.
    """
    target = load_target(target_name)
    hosts = _hosts(target, host) or target.transport.hosts
    may_ask = sys.stdin.isatty() and sys.stdout.isatty() and len(hosts) <= 1
    _fleet(target, host, lambda t: _checked_rollback(t, spec, to, force, may_ask),
           lambda n, cur: typer.echo(f"{n}: current{f' of {spec}' if spec else ''} is now {cur}"), False)
