"""The ``edgeship`` command line. The only place errors become exit codes and one line of text.

Exit codes (pipeline/errors.py): 0 every run passed; 3 a gate failed; 2 bad input (a spec, target,
model or data file that is wrong or hostile) and usage errors; 1 an environment failure (disk
full, network, a device that does not answer, user code that raises); 130 interrupted (Ctrl-C or
SIGTERM).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, ContextManager, Optional

import typer
from rich.console import Console

from pipeline import __version__
from pipeline.errors import AccuracyRegression, BadInput, DeviceError, EdgeshipError, Interrupted

app = typer.Typer(help="edgeship: PyTorch -> ONNX -> edge artifacts, calibrated INT8, deployed and measured.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
targets_app = typer.Typer(help="List, show and validate hardware targets.", no_args_is_help=True)
app.add_typer(targets_app, name="targets")
baseline_app = typer.Typer(help="The pinned baseline the nightly compares each run with.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")
cache_app = typer.Typer(help="The project's stage cache (.edgeship/stages; EDGESHIP_STAGE_CACHE overrides).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(stderr=True)
# Tables are wide (12 columns): when piped or in CI, don't squeeze them into 80 columns.
out_console = Console() if Console().is_terminal else Console(width=200)

SPEC_OPT = typer.Option(..., "--spec", "-s", help="pipeline spec (YAML)")
TARGET_OPT = typer.Option("local", "--target", "-t", help="target name (targets/NAME.yaml) or file")
OUT_OPT = typer.Option(None, "--out", "-o", help="output folder (default build/<spec>/<target>)")
JUNIT_OPT = typer.Option(None, "--junit", help="write JUnit XML here: one test case per device x backend x "
                         "precision, failures carrying the gate's reasons")
JSON_OPT = typer.Option(None, "--json", help="write machine-readable results here ('-': to stdout, and "
                        "nothing else goes to stdout)")
VERBOSE_OPT = typer.Option(False, "--verbose", "-v", help="also show what converters and libraries print "
                           "(the log file, as it is written)")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="print errors and the gate's verdict only")
LOG_FILE_OPT = typer.Option(None, "--log-file", help="the run's log: edgeship's lines and everything "
                            "converters and libraries print (default <out>/log.txt)")


class _GateFailed(AccuracyRegression):
    """The gate failed and the report just printed says why: exit 3 without saying it again."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeship {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """edgeship command line."""


def _load(spec_path: Path, target_name: str) -> tuple[Any, Any]:
    from pipeline.spec import load_spec, load_target

    return load_spec(spec_path), load_target(target_name)


def _out(out: Optional[Path], spec: Any, target: Any) -> Path:
    """``--out``, or build/<spec>/<target> checked to stay inside build/ (names are folder names)."""
    from pipeline.paths import contained

    if out:
        return out
    root = Path("build")
    return contained(root / spec.name / target.name, root, f"{spec.source_path}, {target.source_path}: field 'name'")


def _log(msg: str) -> None:
    from pipeline.output import say

    say(msg)


def _captured(out_dir: Path, log_file: Optional[Path], verbose: bool, quiet: bool) -> ContextManager[None]:
    """The run's output capture (pipeline/output.py): third-party output into the log file,
    our lines onto the console as -v / -q say. Entered after the output folder's lock, so a run
    refused by the lock does not truncate the log of the run that holds it."""
    from pipeline.output import NORMAL, QUIET, VERBOSE, captured

    if verbose and quiet:
        raise typer.BadParameter("choose one of them", param_hint="'--verbose' / '--quiet'")
    header = f"edgeship {__version__}: {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})"
    return captured(log_file or out_dir / "log.txt", VERBOSE if verbose else QUIET if quiet else NORMAL,
                    console, out_console, header)


@app.command()
def build(spec: Path = SPEC_OPT, target: str = TARGET_OPT, out: Optional[Path] = OUT_OPT,
          verbose: bool = VERBOSE_OPT, quiet: bool = QUIET_OPT, log_file: Optional[Path] = LOG_FILE_OPT) -> None:
    """Export, optimize, calibrate and convert for every backend x precision of the target."""
    from pipeline.build import CHECK_SAMPLES, locked_out_dir
    from pipeline.build import build as run_build
    from pipeline.validate.report import print_table

    s, t = _load(spec, target)
    out_dir = _out(out, s, t)
    with locked_out_dir(out_dir, "build"), _captured(out_dir, log_file, verbose, quiet):
        result = run_build(s, t, out_dir, log=_log)
        if quiet:
            return
        checks = [(a, a.info.get("check", {})) for a in result.artifacts]
        rows = [[a.backend, a.precision, _num(c.get("sqnr_db"), "{:.1f}"), _num(c.get("top1_agreement"), "{:.2f}")]
                for a, c in checks]
        print_table(out_console, f"{s.name} for {t.name}: each artifact against fp32 on {CHECK_SAMPLES} "
                    "calibration samples", ("backend", "precision", "SQNR dB", "top-1 agreement %"), rows,
                    [False] * len(rows), left=("backend", "precision"))
        out_console.print(f"release {result.release_id[:12]} -> {result.release_dir}", highlight=False, soft_wrap=True)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _write_json(results: dict[str, Any], json_out: Path, out_dir: Path) -> None:
    """``--json FILE``, or ``--json -``: the document alone on stdout (the report goes to stderr)."""
    from pipeline.validate.write import split_sides

    doc, _ = split_sides(results)
    for side in ("timings_file", "outputs_file"):  # the side files written beside results.json, by full path
        if doc.get(side):
            doc[side] = str((out_dir / doc[side]).resolve())
    _emit_json(doc, json_out)


def _emit_json(doc: dict[str, Any], json_out: Path) -> None:
    """``doc`` into ``json_out``, or alone on stdout for ``-``."""
    text = json.dumps(doc, indent=1, default=str) + "\n"
    if str(json_out) == "-":
        out_console.file.write(text)
        out_console.file.flush()
        return
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(text)


def _finish(results: dict[str, Any], json_out: Optional[Path], out_dir: Path, junit: Optional[Path] = None,
            quiet: bool = False) -> None:
    from pipeline.validate.junit import write_junit
    from pipeline.validate.report import print_gate, print_report
    from pipeline.validate.write import write_reports

    write_reports(results, out_dir)  # results.json, report.md, report.html
    if junit:
        write_junit(junit, [results])
    if json_out:
        _write_json(results, json_out, out_dir)
    shown = console if json_out and str(json_out) == "-" else out_console
    if any(d.get("runs") for d in results["devices"]):
        (print_gate if quiet else print_report)(results, shown)
    errors = [f"{d['device']}: {d['error']}" if not str(d["error"]).startswith(d["device"]) else str(d["error"])
              for d in results["devices"] if d.get("error")]
    if errors:
        # The device could not be measured (connection, host key, disk, ...): not a gate verdict.
        raise DeviceError("; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""))
    if not results["gate"]["passed"]:
        raise _GateFailed("; ".join(results["gate"]["reasons"][:3]) or "gate failed")


@app.command()
def deploy(spec: Path = SPEC_OPT, target: str = TARGET_OPT, out: Optional[Path] = OUT_OPT,
           json_out: Optional[Path] = JSON_OPT,
           host: Optional[list[str]] = typer.Option(None, "--host", help="only these hosts of the target"),
           no_rollback: bool = typer.Option(False, "--no-rollback", help="keep a release that fails the gate"),
           keep_passing: bool = typer.Option(False, "--keep-passing", help="keep the release when at least one run "
                                             "passed (exit 3 still); results name the recommended run"),
           require: Optional[str] = typer.Option(None, "--require", help="'all' runs must pass for the release to "
                                                 "stay (the default), or 'any' (= --keep-passing)"),
           junit: Optional[Path] = JUNIT_OPT,
           backend: Optional[list[str]] = typer.Option(None, "--backend", help="only this backend's builds of the "
                                                       "target (repeatable)"),
           skip_unavailable: bool = typer.Option(False, "--skip-unavailable", help="skip builds whose converter "
                                                 "is not available on this host (a device without a runtime "
                                                 "still fails its runs)"),
           verbose: bool = VERBOSE_OPT, quiet: bool = QUIET_OPT, log_file: Optional[Path] = LOG_FILE_OPT) -> None:
    """Build, ship to the target's devices, measure there, gate (exit 3 when the gate fails)."""
    from pipeline.build import locked_out_dir
    from pipeline.deploy import deploy as run_deploy
    from pipeline.registry import select_builds

    if require not in (None, "all", "any") or (keep_passing and require == "all"):
        raise typer.BadParameter("'all' or 'any'; --keep-passing is --require any", param_hint="'--require'")
    s, t = _load(spec, target)
    t = select_builds(t, backend, skip_unavailable, log=_log)
    out_dir = _out(out, s, t)
    # The whole deploy, not just its build: a second run must not replace the release being uploaded.
    with locked_out_dir(out_dir, "deploy"), _captured(out_dir, log_file, verbose, quiet):
        results = run_deploy(s, t, out_dir, hosts=host, rollback_on_fail=not no_rollback,
                             require="any" if keep_passing else require or "all", log=_log)
        _finish(results, json_out, out_dir, junit, quiet)


@app.command()
def validate(spec: Path = SPEC_OPT, target: str = TARGET_OPT, out: Optional[Path] = OUT_OPT,
             json_out: Optional[Path] = JSON_OPT,
             host: Optional[list[str]] = typer.Option(None, "--host"),
             junit: Optional[Path] = JUNIT_OPT, verbose: bool = VERBOSE_OPT, quiet: bool = QUIET_OPT,
             log_file: Optional[Path] = LOG_FILE_OPT) -> None:
    """Re-measure the release deployed on the target's devices now and gate it (no build, no upload)."""
    from pipeline.build import locked_out_dir
    from pipeline.deploy import validate_current

    s, t = _load(spec, target)
    out_dir = _out(out, s, t)
    with locked_out_dir(out_dir, "validate"), _captured(out_dir, log_file, verbose, quiet):
        _finish(validate_current(s, t, out_dir, hosts=host, log=_log), json_out, out_dir, junit, quiet)


@app.command()
def analyze(spec: Path = SPEC_OPT, json_out: Optional[Path] = typer.Option(
                None, "--json", help="write the whole analysis (every layer) here ('-': to stdout, and nothing "
                "else goes to stdout)"),
            top: int = typer.Option(10, "--top", min=1, help="how many layers the table shows (the most MACs first)"),
            all_layers: bool = typer.Option(False, "--all", help="show every layer, in graph order"),
            verbose: bool = VERBOSE_OPT, quiet: bool = QUIET_OPT, log_file: Optional[Path] = LOG_FILE_OPT) -> None:
    """Per layer and in total: parameters, MACs, other ops and activation memory of the optimized
    ONNX model the backends consume (the export and optimize stages, cached; no release, no device)."""
    from pipeline.analyze import analysis_document, print_analysis
    from pipeline.build import input_shapes, optimized_model
    from pipeline.paths import contained
    from pipeline.spec import load_spec

    s = load_spec(spec)
    # beside the spec's target folders, never in one: analyze writes no release and takes no target's lock
    log = log_file or contained(Path("build") / s.name / "analyze.log", Path("build"), f"{s.source_path}: field 'name'")
    with _captured(log.parent, log, verbose, quiet):
        onnx_path, opt_info = optimized_model(s, log=_log)
        doc = analysis_document(onnx_path, input_shapes(s))
    doc = {"spec": s.name, "model": str(onnx_path), "batch": s.input.shape[0], **doc,
           "optimize": {k: opt_info.get(k) for k in ("ops_before", "bn_folded", "bn_left") if k in opt_info}}
    if json_out:
        _emit_json(doc, json_out)
    print_analysis(doc, console if json_out and str(json_out) == "-" else out_console, None if all_layers else top)


@app.command()
def nightly(spec: Optional[list[Path]] = typer.Option(None, "--spec", "-s", help="specs (default: the mnist, efficientnet_lite0 and mobilenet_v2 examples)"),
            target: Optional[list[str]] = typer.Option(None, "--target", "-t", help="targets (default: local)"),
            out: Path = typer.Option(Path("build/nightly"), "--out", "-o"),
            history: Path = typer.Option(Path("build/history"), "--history", help="where the history is kept"),
            tolerance_pp: float = typer.Option(0.5, "--tolerance-pp",
                                               help="allowed fall below the last good run, pp"),
            junit: Optional[Path] = JUNIT_OPT, verbose: bool = VERBOSE_OPT, quiet: bool = QUIET_OPT,
            log_file: Optional[Path] = LOG_FILE_OPT) -> None:
    """Deploy every spec to every target, append to the history, fail on gate failures or regressions."""
    from pipeline.nightly import REFERENCE_SPECS, run_nightly
    from pipeline.spec import project_root

    specs = spec or [project_root() / "examples" / f"{name}.yaml" for name in REFERENCE_SPECS]
    with _captured(out, log_file, verbose, quiet):  # one log for the night: <out>/log.txt
        summary = run_nightly(specs, target or ["local"], out, history, tolerance_pp, log=_log, junit=junit)
    for pair in summary["pairs"]:
        mark = "[green]pass[/green]" if pair["passed"] else "[red]FAIL[/red]"
        out_console.print(f"{pair['spec']:<20} {pair['target']:<12} {mark}")
        for reason in pair["reasons"]:
            out_console.print(f"    [red]- {reason}[/red]")
    if not summary["passed"]:
        raise AccuracyRegression("nightly: " + "; ".join(
            f"{p['spec']} on {p['target']}" for p in summary["pairs"] if not p["passed"]) + " failed")


@baseline_app.command("pin")
def baseline_pin(spec: Path = SPEC_OPT, target: str = TARGET_OPT, out: Optional[Path] = OUT_OPT,
                 baselines: Path = typer.Option(Path("baselines"), "--baselines",
                                                help="where baselines live (commit them)")) -> None:
    """Pin the last deploy's results (<out>/results.json, per-sample outcomes included) as the baseline."""
    from pipeline.validate.baseline import pin_results_file

    s, t = _load(spec, target)
    path = pin_results_file(_out(out, s, t) / "results.json", baselines / s.name / f"{t.name}.json")
    out_console.print(f"baseline of {s.name} on {t.name} pinned: {path}")


@app.command()
def history(spec: Path = SPEC_OPT, target: str = TARGET_OPT,
            history_dir: Path = typer.Option(Path("build/history"), "--history", help="where the history is kept"),
            accept_runs: bool = typer.Option(False, "--accept", help="accept the newest night's regressions as the "
                                             "new last good (an intended change); needs --reason"),
            run: list[str] = typer.Option([], "--run", help="with --accept: only this run (e.g. ncnn-int8); repeatable"),
            reason: str = typer.Option("", "--reason", help="with --accept: why the change is intended")) -> None:
    """The nightly's trend: the spec's metric, p50 and verdict per night and run. With --accept, first
    make the newest night's regressed runs the last good ones the next nights compare with."""
    from pipeline.nightly import accept, history_file
    from pipeline.validate.report import print_table
    from pipeline.validate.trend import HISTORY_TEXT_COLUMNS, history_columns, history_rows, read_history

    s, t = _load(spec, target)
    if (run or reason) and not accept_runs:
        raise BadInput("edgeship history: --run and --reason go with --accept")
    path = history_file(history_dir, s.name, t.name)
    if accept_runs:
        accepted = accept(path, run, reason)["accepted"]
        out_console.print(f"accepted {', '.join(accepted['runs'])} of {accepted['night']} as last good: {accepted['reason']}")
    entries = read_history(path)
    rows = history_rows(entries)
    print_table(out_console, f"{s.name} on {t.name}: nightly history", history_columns(entries), rows,
                [row[-1] == "FAIL" for row in rows], left=HISTORY_TEXT_COLUMNS)


@targets_app.command("list")
def targets_list() -> None:
    """Every target found, with its architecture, transport and builds."""
    from pipeline.spec import list_target_names, load_target

    for name in list_target_names():
        t = load_target(name)
        builds = ", ".join(f"{b.backend}[{'/'.join(b.precisions)}]" for b in t.builds)
        ext = f" (extends {t.extends})" if t.extends else ""
        out_console.print(f"{name:<18} {t.arch:<8} {t.transport.kind:<5} {builds}{ext}", highlight=False, markup=False, soft_wrap=True)


@targets_app.command("show")
def targets_show(name: str) -> None:
    """The resolved target (after extends:), as YAML."""
    import yaml

    from pipeline.spec import load_target

    t = load_target(name)
    out_console.print(yaml.safe_dump(t.model_dump(mode="json"), sort_keys=False), highlight=False, markup=False, soft_wrap=True)


@targets_app.command("schema")
def targets_schema(spec: bool = typer.Option(False, "--spec", help="the pipeline spec's schema instead")) -> None:
    """JSON Schema for target files (or pipeline specs), for editors."""
    from pipeline.spec import spec_schema, target_schema

    typer.echo(json.dumps(spec_schema() if spec else target_schema(), indent=1))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@cache_app.command("info")
def cache_info() -> None:
    """Where the stage cache is, how big, and its entries per stage."""
    from pipeline.cache import Cache

    c = Cache()
    stages = c.stages()
    out_console.print(f"stage cache: {c.root} ({_mb(sum(b for _, b in stages.values()))})", highlight=False,
                      markup=False, soft_wrap=True)
    for name, (entries, size) in stages.items():
        out_console.print(f"  {name:<14} {entries:>4} entries  {_mb(size):>10}", highlight=False, markup=False)


@cache_app.command("clean")
def cache_clean(stage: Optional[str] = typer.Option(None, "--stage", help="only this stage's entries")) -> None:
    """Remove the stage cache's entries (all, or one stage's); the next build rebuilds them."""
    from pipeline.cache import Cache

    c = Cache()
    freed = c.clean(stage)
    out_console.print(f"removed {'stage ' + stage if stage else 'every stage'} from {c.root}: {_mb(freed)} freed",
                      highlight=False, markup=False, soft_wrap=True)


def _mount_optional() -> None:
    """Sub-apps from pipeline.sim and pipeline.transport (typer apps; light imports)."""
    from pipeline.sim.cli import app as sim_app
    from pipeline.transport.cli import devices_app, rollback

    app.add_typer(sim_app, name="sim", help="Emulated devices (QEMU aarch64, x86_64) with real sshd.")
    app.add_typer(devices_app, name="devices", help="Trust, probe, provision devices; list releases.")
    app.command("rollback")(rollback)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _usage_line(exc: typer.TyperException) -> str:
    """One line for a usage error: what is wrong, the command's usage and where help is.

    Built from the usage pieces, not ``ctx.get_usage()``: with rich installed typer prints the
    whole help page from there instead of returning the line.
    """
    from typer._click.exceptions import NoArgsIsHelpError  # the pinned typer's vendored click

    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return " ".join(exc.format_message().split())
    # A command group called with nothing to do carries the whole help page as its message.
    message = "a command is required" if isinstance(exc, NoArgsIsHelpError) else " ".join(exc.format_message().split())
    usage = " ".join([ctx.command_path, *ctx.command.collect_usage_pieces(ctx)])
    return f"{message} (usage: {usage}; see '{ctx.command_path} --help')"


def run(typer_app: typer.Typer, argv: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run ``typer_app`` and map what it raises to an exit code and one line on stderr.

    0 success; 2 bad input and usage errors; 3 a gate failed; 1 an environment failure; 130
    interrupted (Ctrl-C, or SIGTERM, which is turned into KeyboardInterrupt here so every
    ``finally`` and rollback on the way out runs exactly as for Ctrl-C).
    """
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # standalone_mode=False: typer returns the code of typer.Exit (and 130 for a
        # KeyboardInterrupt raised inside a command) instead of calling sys.exit itself.
        code = typer_app(args=argv, prog_name=prog_name, standalone_mode=False)
        code = int(code) if isinstance(code, int) else 0
    except _GateFailed as exc:  # the report printed the verdict and its reasons once
        return exc.exit_code
    except Interrupted as exc:
        code = exc.exit_code
        console.print(f"edgeship: interrupted{': ' + str(exc) if str(exc) else ''}", highlight=False, soft_wrap=True)
        return code
    except EdgeshipError as exc:
        console.print(f"[bold red]edgeship: error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # Abort: EOF at a prompt; KeyboardInterrupt: outside a command
        code = 130
    except typer.TyperException as exc:  # typer's vendored click: usage errors (exit 2), file errors
        console.print(f"edgeship: error: {_usage_line(exc)}", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    except OSError as exc:
        from pipeline.cache import disk_full

        if disk_full(exc) is None:
            raise
        # Where no stage said it more precisely (results, reports, the lock file): still one line.
        console.print(f"edgeship: error: no space left on the disk of {exc.filename or 'an output file'}; "
                      "free some space there", highlight=False, markup=False, soft_wrap=True)
        return 1
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    if code == 130:
        console.print("edgeship: interrupted", highlight=False)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: ``edgeship ...``; see :func:`run` for the exit codes."""
    try:
        _mount_optional()
    except KeyboardInterrupt:
        console.print("edgeship: interrupted", highlight=False)
        return 130
    return run(app, argv)


if __name__ == "__main__":
    sys.exit(main())
