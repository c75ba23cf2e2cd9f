"""Human-readable report (rich table on the terminal, Markdown file) from the results document."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.backends.coverage import coverage_line

RESULTS_SCHEMA = "edgeship.results/2"  # /2: accuracy_drop_interval, regressions (README)


def _f(v: Any, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def size(n: int | None) -> str:
    """Bytes as every report and log line writes them: kB below a MiB, MB above."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} kB"


# batch: the spec's input batch; latency, RSS and throughput are per call of that many samples
COLUMNS = ("device", "backend", "precision", "batch", "accuracy %", "drop pp", "SQNR dB", "p50 ms", "p90 ms",
           "p99 ms", "CV", "peak RSS MB", "size", "gate")
LEFT = ("device", "backend", "precision", "gate")  # text columns; the others are numbers, right-aligned
# the accuracy column of a built-in metric: its name and unit (map is mAP x 100, points, not %)
METRIC_LABELS = {"top1": "top1 %", "top5": "top5 %", "fidelity": "agreement %", "map": "mAP"}


def metric_label(results: dict[str, Any]) -> str:
    """The name the accuracy column goes by: the spec's metric and its unit (a user metric's name)."""
    name = str((results.get("reference") or {}).get("metric") or "accuracy")
    return METRIC_LABELS.get(name, "accuracy %" if name == "accuracy" else name)


def interval_note(results: dict[str, Any]) -> str | None:
    """Why the runs have no drop interval (a map or user metric under accuracy.decision point)."""
    return next((r["accuracy_drop_interval_note"] for d in results.get("devices", []) for r in d.get("runs", [])
                 if r.get("accuracy_drop_interval_note")), None)


def columns(results: dict[str, Any]) -> tuple[str, ...]:
    """:data:`COLUMNS` with the accuracy and drop columns named for the results' metric: percentage
    points for a % metric, the metric's points otherwise, the rise for a lower-is-better one."""
    label = metric_label(results)
    lower = (results.get("reference") or {}).get("higher_is_better") is False
    drop = "drop pp" if label.endswith("%") else ("rise (drop)" if lower else "drop")
    return tuple(label if c == "accuracy %" else drop if c == "drop pp" else c for c in COLUMNS)


def _cv(lat: dict[str, Any]) -> str:
    """The timings' coefficient of variation, flagged when over validation.max_cv (its ratios are
    not to be trusted: measure again, or set validation.retry_unstable)."""
    cv = _f(lat.get("cv"))
    return f"{cv} unstable" if lat.get("unstable") else cv


def budget_rule(results: dict[str, Any]) -> str | None:
    """How the budget was applied (``accuracy_decision``), where a report prints the budget; None for
    ``point``, the default, whose reports read as they always have."""
    decision = results.get("accuracy_decision") or "point"
    if decision == "point":
        return None
    return f"on the upper end of each run's 95 % drop interval (accuracy.decision: {decision})"


def conditions_line(dev: dict[str, Any]) -> str | None:
    """What the device was doing while measured: governor, frequency, temperature, load and the
    flags that make its timings suspect (None when the agent reported no conditions)."""
    cond = dev.get("conditions") or {}
    before = cond.get("before") or {}
    if not before:
        return None
    cores = before.get("cpufreq") or {}
    governors = sorted({c.get("governor") for c in cores.values() if c.get("governor")})
    mhz = [c["mhz"] for c in cores.values() if c.get("mhz")]
    temps = [z["temp_c"] for z in (cond.get("after") or before).get("thermal") or [] if z.get("temp_c") is not None]
    load = (before.get("loadavg") or {}).get("1m")
    parts = [f"governor {'/'.join(governors)}" if governors else None,
             f"{min(mhz):.0f}-{max(mhz):.0f} MHz" if mhz else None,
             f"max {max(temps):.0f} C" if temps else None,
             f"load {load:.2f} on {before.get('cpus')} cpus" if load is not None else None,
             _settle_text(cond.get("settle_ms") or {})]
    flags = cond.get("flags") or []
    text = ", ".join(p for p in parts if p)
    return f"{dev['device']}: measured with {text or 'no clock data'}" + (f"; FLAGGED: {', '.join(flags)}" if flags else "")


def _settle_text(settle: dict[str, Any]) -> str | None:
    """How long the chunks waited for other runs' threads to go idle (agent's settle.py)."""
    if not settle.get("n"):
        return None
    return f"each of {settle['n']} chunks after a wait for idle threads (median {settle['median']:.0f} ms, max {settle['max']:.0f})"


def rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for dev in results["devices"]:
        if dev.get("error") and not dev.get("runs"):
            out.append([dev["device"]] + ["-"] * (len(COLUMNS) - 2) + ["ERROR"])
            continue
        for r in dev["runs"]:
            lat = r.get("latency_ms") or {}
            out.append([
                dev["device"], r["backend"], r["precision"], _f(r.get("batch"), "{}"), _f(r.get("accuracy")),
                _f(r.get("accuracy_drop_pp"), "{:+.2f}"), _f(r.get("sqnr_db"), "{:.1f}"),
                _f(lat.get("p50"), "{:.3f}"), _f(lat.get("p90"), "{:.3f}"), _f(lat.get("p99"), "{:.3f}"),
                _cv(lat), _f(r.get("peak_rss_mb"), "{:.1f}"), size(r.get("artifact_bytes")),
                "pass" if r.get("gate", {}).get("passed") else "FAIL",
            ])
    return out


def plain_table(columns: tuple[str, ...], table_rows: list[list[str]], left: tuple[str, ...] = LEFT) -> list[str]:
    """Aligned columns without box drawing, for a pipe, a CI log or a file: text columns
    left-aligned, numbers right-aligned, two spaces between columns, no trailing blanks."""
    widths = [max([len(c)] + [len(r[i]) for r in table_rows]) for i, c in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if col in left else cell.rjust(w)
                         for cell, w, col in zip(cells, widths, columns)).rstrip()

    return [line(columns)] + [line(r) for r in table_rows]


def print_table(console: Console, title: str, columns: tuple[str, ...], table_rows: list[list[str]],
                failed: list[bool], left: tuple[str, ...] = LEFT) -> None:
    """The rich table on a terminal, :func:`plain_table` anywhere else; ``failed`` rows in red."""
    if not console.is_terminal:
        for text in [title, *plain_table(columns, table_rows, left)]:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    for row, bad in zip(table_rows, failed):
        table.add_row(*row, style="red" if bad else None)
    console.print(table)


def _line(console: Console, text: str, style: str | None = None) -> None:
    """A line under the table: styled on a terminal, never wrapped (a pipe keeps it whole)."""
    console.print(text, style=style if console.is_terminal else None, markup=False, highlight=False,
                  soft_wrap=True)


def print_gate(results: dict[str, Any], console: Console) -> None:
    """The verdict, and each reason of a failure (the only place they are printed: the CLI exits 3
    without repeating them as an error)."""
    gate = results["gate"]
    if gate["passed"]:
        _line(console, "gate: PASSED", "bold green")
        return
    _line(console, "gate: FAILED", "bold red")
    for reason in gate["reasons"]:
        _line(console, f"  - {reason}", "red")


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    ref = results.get("reference", {})
    ties = f", agreement within fp32 ties of {ref['tie_margin']}" if ref.get("tie_margin") else ""
    unit = "%" if metric_label(results).endswith("%") else ""
    title = (f"{results['spec']} on {results['target']} - fp32 reference {ref.get('metric')} "
             f"{_f(ref.get('accuracy'))}{unit} ({ref.get('samples')} samples{ties}), budget {results.get('budget_pp')} "
             + ("pp" if unit else "points")
             + (f" {rule}" if (rule := budget_rule(results)) else ""))
    table_rows = rows(results)
    print_table(console, title, columns(results), table_rows, [row[-1] != "pass" for row in table_rows])
    if line := recommended_line(results):
        _line(console, line, "bold")
    for dev in results["devices"]:
        dep = dev.get("deploy") or {}
        if dep:
            _line(console, f"{dev['device']}: release {str(dep.get('release_id', ''))[:12]}, "
                           f"{size(dep.get('bytes_moved', 0))} moved"
                           f"{', rolled back to ' + str(dev.get('rolled_back_to'))[:12] if dev.get('rolled_back') else ''}",
                  "dim")
        if dev.get("error"):
            _line(console, f"{dev['device']}: {dev['error']}", "red")
        if line := conditions_line(dev):
            _line(console, line, "yellow" if "FLAGGED" in line else "dim")
        for line in slower_lines(dev):
            _line(console, line, "yellow")
        for r in dev.get("runs", []):
            for line in run_lines(dev["device"], r):
                _line(console, line, "dim")
            cal = r.get("calibration") or {}
            if cal.get("method"):
                kept = cal.get("fallback_layers") or []
                worst = cal.get("worst_tensors") or []
                _line(console, f"{dev['device']} {r['id']}: calibration {cal['method']}"
                               f"{' (' + cal['reason'] + ')' if cal.get('reason') else ''}"
                               f"{', kept in float: ' + ', '.join(str(k.get('name', k)) for k in kept) if kept else ''}"
                               f"{', lowest SQNR: ' + _worst(worst[:3]) if worst else ''}", "dim")
            if line := coverage_line(r.get("int8_coverage"), r.get("device_build")):
                _line(console, f"{dev['device']} {r['id']}: {line}", "dim")
    print_gate(results, console)


def run_lines(device: str, r: dict[str, Any]) -> list[str]:
    """What a run measured beyond the table: its power from the board's own sensor (or why not),
    and the artifact it built on the device (engine built or cached)."""
    out = []
    power = r.get("power") or {}
    if power.get("error"):
        out.append(f"{device} {r['id']}: power sensor {power.get('sensor')} not read: {power['error']}")
    elif power:
        idle = "" if power.get("idle_w") is None else f", idle {power['idle_w']:.2f} W"
        out.append(f"{device} {r['id']}: power {power['mean_w']:.2f} W (p90 {power['p90_w']:.2f}{idle}) over "
                   f"{power['window_s']:.1f} s, {power['energy_mj_per_inference']:.3f} mJ/inference above idle "
                   f"({power['sensor']})")
    build = r.get("device_build") or {}
    if build:
        what = "engine cached" if build.get("cached") else f"engine built in {build.get('seconds', 0):.1f} s"
        out.append(f"{device} {r['id']}: {what} on the device ({build.get('builder')})")
    return out


def slower_lines(dev: dict[str, Any]) -> list[str]:
    """Each reduced-precision run that ran slower than its backend's fp32 on this device, both
    timed in the same interleaved rounds, with their p50 intervals apart (not noise): on a CPU
    whose float kernels are fast, float layers kept by the calibration fallback (each a crossing
    in and out of int8) can cost more than int8 saves, and the user should ship fp32 there."""
    runs = dev.get("runs") or []
    fp32 = {r["backend"]: r.get("latency_ms") or {} for r in runs if r.get("precision") == "fp32"}
    out = []
    for r in runs:
        lat, ref = r.get("latency_ms") or {}, fp32.get(r.get("backend"))
        if r.get("precision") == "fp32" or not ref or not all(
                isinstance(d.get(k), (int, float)) for d in (lat, ref) for k in ("p50", "p50_low", "p50_high")):
            continue
        if lat["p50_low"] <= ref["p50_high"]:
            continue
        out.append(f"{dev['device']} {r['id']}: SLOWER than {r['backend']} fp32 ({ref['p50'] / lat['p50']:.2f}x, "
                   f"p50 {lat['p50']:.3f} vs {ref['p50']:.3f} ms): {_slower_advice(r)}")
    return out


def _slower_advice(r: dict[str, Any]) -> str:
    kept = len((r.get("calibration") or {}).get("fallback_layers") or [])
    fp32 = f"ship {r['backend']} fp32 on this device"
    if r.get("precision") != "int8":
        return f"no {r.get('precision')} arithmetic pays on this device for {r['backend']}: {fp32} unless size matters"
    if kept:
        return (f"its {kept} float layer(s) from the calibration fallback cost more than int8 saves here; {fp32}, "
                "or lower calibration.min_sqnr_db / raise the budget so fewer layers stay float")
    return f"its int8 kernels are not faster than the float ones here; {fp32}"


def recommended_line(results: dict[str, Any]) -> str | None:
    """The run to use (results' ``recommended``, chosen by the spec's deploy.recommend), or why none."""
    if "recommended" not in results or not any(d.get("runs") for d in results["devices"]):
        return None
    rec = results["recommended"]
    if not rec:
        return "recommended: none (no run passed the gate on every device)"
    figure = {"fastest": f"p90 {_f(rec.get('p90_ms'))} ms", "smallest": size(rec.get("artifact_bytes") or 0),
              "most-accurate": f"accuracy {_f(rec.get('accuracy'))}%"}.get(rec["policy"], "")
    return f"recommended: {rec['run']} ({rec['policy']}: {figure}, within every limit)"


def _worst(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['tensor']} {float(t['sqnr_db']):.1f} dB" for t in tensors)


def _header(results: dict[str, Any]) -> list[str]:
    """Title and what the numbers belong to: when, which release, which code, the reference and budget."""
    ref = results.get("reference") or {}
    versions = results.get("versions") or {}
    code = f"edgeship {versions.get('edgeship')}" + (f" ({str(versions['commit'])[:12]})" if versions.get("commit") else "")
    parts = [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             f"release {str(results['release_id'])[:12]}" if results.get("release_id") else None,
             code if versions else None,
             f"fp32 reference {ref.get('metric')} {_f(ref.get('accuracy'))} on {ref.get('samples')} samples" if ref else None,
             f"budget {results.get('budget_pp')} pp" if results.get("budget_pp") is not None else None]
    return [f"# {results.get('spec')} on {results.get('target')}", "", " · ".join(p for p in parts if p), ""]


def markdown(results: dict[str, Any]) -> str:
    lines = _header(results) + ["| " + " | ".join(columns(results)) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    lines += ["", note] if (note := interval_note(results)) else []
    lines += ["", line] if (line := recommended_line(results)) else []
    rule = budget_rule(results)
    if rule:  # the verdict under a rule other than the default, with its reasons (inconclusive runs say N)
        gate = results.get("gate") or {}
        lines += ["", f"gate {'PASSED' if gate.get('passed') else 'FAILED'}, budget {results.get('budget_pp')} pp {rule}"]
        lines += [f"- {r}" for r in gate.get("reasons") or []]
    lines += ["", line] if (line := "\n".join(filter(None, map(conditions_line, results["devices"])))) else []
    measured = [f"- {line}" for dev in results["devices"] for r in dev.get("runs", []) for line in run_lines(dev["device"], r)]
    measured += [f"- {line}" for dev in results["devices"] for line in slower_lines(dev)]
    lines += [""] + measured if measured else []
    for dev in results["devices"]:
        for r in dev.get("runs", []):
            cal = r.get("calibration") or {}
            if not cal.get("method"):
                continue
            lines += ["", f"**{dev['device']} {r['id']}**: calibration `{cal['method']}`"
                      + (f" ({cal['reason']})" if cal.get("reason") else "")]
            kept = cal.get("fallback_layers") or []
            if kept:
                lines.append("kept in float: " + ", ".join(f"`{k.get('name', k)}`" for k in kept))
            if line := coverage_line(r.get("int8_coverage"), r.get("device_build")):
                lines.append(line)
            if cal.get("budget_met") is False:
                lines.append(f"budget not met: {cal.get('budget_reason') or 'see the calibration report'}")
            if cal.get("worst_tensors"):
                lines.append("lowest per-tensor SQNR vs fp32 (holdout; where the int8 error enters): "
                             + _worst(cal["worst_tensors"]))
    return "\n".join(lines) + "\n"
