"""``report.html``: one self-contained file (inline CSS, plots as base64 PNG) from a results document.

Sections: title, spec, target, date, versions, release, fp32 reference, budget and limits, the
verdict, each device's probe, the runs table (the same rows as report.md), where INT8 lost accuracy
(the calibration block) and three plots: latency distribution per run (raw timings when given,
else the agent's percentiles), accuracy vs p90 latency with the budget line, artifact size per run.
Given the nightly's history, it adds the last nights' table and accuracy and p50 over time per run.
matplotlib (the ``report`` extra) draws the plots with the Agg backend and is imported only here;
without it the report says so and keeps everything else.
"""

from __future__ import annotations

import base64
import io
import time
from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline import __version__
from pipeline.validate.report import (COLUMNS, budget_rule, columns, conditions_line, metric_label, recommended_line,
                                      rows, slower_lines)
from pipeline.validate.stats import MAX_CV, coefficient_of_variation
from pipeline.validate.trend import Series, series

# Nights shown in the history table of a nightly report.
HISTORY_NIGHTS = 10
# Raw timings (ms) per run, keyed "<device>/<run id>" (the results' ``timings_file``).
Timings = Mapping[str, Sequence[float]]

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:nth-child(-n+3),th{text-align:left}tr.fail td{background:#fde8e8}.pass{color:#176d2c}.fail{color:#b3261e}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{background:#f4f4f4;padding:0 3px}"""


def _label(results: dict[str, Any], device: str, row: dict[str, Any]) -> str:
    several = len(results.get("devices", [])) > 1
    return f"{device} {row['backend']} {row['precision']}" if several else f"{row['backend']} {row['precision']}"


def _runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(str(d["device"]), r) for d in results.get("devices", []) for r in d.get("runs", [])]


# ---- plots ---------------------------------------------------------------------------------------

def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _latency_plot(results: dict[str, Any], timings: Timings) -> str | None:
    import matplotlib.pyplot as plt

    stats, labels = [], []
    for device, row in _runs(results):
        raw = timings.get(f"{device}/{row['id']}")
        lat = row.get("latency_ms") or {}
        if raw is not None and len(raw):
            t = np.asarray(raw, dtype=np.float64)
            q1, med, q3, p99 = np.percentile(t, [25, 50, 75, 99])
            stats.append({"med": med, "q1": q1, "q3": q3, "whislo": float(t.min()), "whishi": p99, "fliers": []})
            labels.append(_label(results, device, row))
        elif lat.get("p50") is not None:  # no raw timings: the box is p50..p90, whiskers min..p99
            stats.append({"med": lat["p50"], "q1": lat["p50"], "q3": lat.get("p90", lat["p50"]),
                          "whislo": lat.get("min", lat["p50"]), "whishi": lat.get("p99", lat["p50"]), "fliers": []})
            labels.append(_label(results, device, row) + " (percentiles)")
    if not stats:
        return None
    for s, label in zip(stats, labels):
        s["label"] = label
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(stats) + 1.2))
    ax.bxp(stats, orientation="horizontal", showfliers=False)
    ax.invert_yaxis()  # runs top to bottom in the table's order
    highs, lows = [s["whishi"] for s in stats], [s["whislo"] for s in stats]
    if min(lows) > 0 and max(highs) / min(lows) > 20:  # fp32 next to int8 on a slow board: keep both readable
        ax.set_xscale("log")
    ax.set_xlabel("latency per batch, ms (box: quartiles, or p50..p90; whiskers: min..p99)")
    ax.set_title("latency distribution per run")
    return _png(fig)


def _accuracy_plot(results: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    ref = results.get("reference") or {}
    points = [(device, r) for device, r in _runs(results)
              if r.get("accuracy") is not None and (r.get("latency_ms") or {}).get("p90") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for device, r in points:
        x, y = r["latency_ms"]["p90"], r["accuracy"]
        iv = r.get("accuracy_drop_interval")
        yerr = None
        if iv and ref.get("accuracy") is not None:  # accuracy range = reference - drop interval
            yerr = [[max(0.0, y - (ref["accuracy"] - iv["high_pp"]))], [max(0.0, ref["accuracy"] - iv["low_pp"] - y)]]
        passed = (r.get("gate") or {}).get("passed")
        ax.errorbar([x], [y], yerr=yerr, fmt="o", color="#176d2c" if passed else "#b3261e", capsize=3)
        ax.annotate(_label(results, device, r), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if ref.get("accuracy") is not None and results.get("budget_pp") is not None:
        floor = ref["accuracy"] - float(results["budget_pp"])
        ax.axhline(floor, color="#b3261e", linestyle="--", label=f"budget: fp32 {ref['accuracy']:.2f} - "
                   f"{results['budget_pp']} pp")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("p90 latency, ms")
    ax.set_ylabel(metric_label(results))
    ax.set_title("accuracy vs p90 latency (bars: 95 % interval of the drop)")
    return _png(fig)


def _size_plot(results: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    bars = [(_label(results, d, r), float(r["artifact_bytes"])) for d, r in _runs(results) if r.get("artifact_bytes")]
    if not bars:
        return None
    unit, scale = ("MB", 2**20) if max(b[1] for b in bars) >= 2**20 else ("kB", 1024)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars], [b[1] / scale for b in bars], color="#4a6fa5")
    ax.invert_yaxis()
    ax.set_xlabel(f"artifact size, {unit}")
    ax.set_title("size per run")
    return _png(fig)


def _trend_plot(data: Series, label: str = "accuracy %") -> str | None:
    """Accuracy (top) and p50 (bottom) per night, one line per run."""
    import matplotlib.pyplot as plt

    nights = sorted({when for points in data.values() for when, *_ in points})
    if len(nights) < 2:  # one night is the runs table, not a trend
        return None
    fig, (acc_ax, lat_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key, points in sorted(data.items()):
        xs = [nights.index(when) for when, *_ in points]
        acc_ax.plot(xs, [p[1] for p in points], marker="o", label=key)
        lat_ax.plot(xs, [p[2] for p in points], marker="o", label=key)
    acc_ax.set_ylabel(label)
    acc_ax.set_title("accuracy and p50 latency per night")
    acc_ax.legend(fontsize=7, loc="best")
    lat_ax.set_ylabel("p50 ms")
    lat_ax.set_xticks(range(len(nights)), [n[:16] for n in nights], rotation=30, ha="right", fontsize=7)
    return _png(fig)


def plots(results: dict[str, Any], timings: Timings | None = None,
          history: list[dict[str, Any]] | None = None) -> dict[str, str | None] | str:
    """Base64 PNGs by plot name, or the reason there are none (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return "plots need matplotlib: pip install 'edgeship[report]'"
    return {"latency": _latency_plot(results, timings or {}), "accuracy": _accuracy_plot(results),
            "size": _size_plot(results), "trend": _trend_plot(series(history), metric_label(results)) if history else None}


# ---- sections ------------------------------------------------------------------------------------

def _dl(items: Sequence[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items if v is not None) + "</dl>"


def _runtime(row: dict[str, Any]) -> str:
    version = str(row["runtime_version"])
    return version if version.startswith(row["backend"]) else f"{row['backend']} {version}"


def _header(results: dict[str, Any]) -> str:
    ref = results.get("reference") or {}
    runtimes = sorted({_runtime(r) for _, r in _runs(results) if r.get("runtime_version")})
    versions = {"edgeship": __version__, **(results.get("versions") or {})}
    limits = results.get("limits") or {}
    return _dl([
        ("spec", results.get("spec")), ("target", results.get("target")),
        ("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) + (", " + ", ".join(runtimes) if runtimes else "")),
        ("release", results.get("release_id") or "as deployed"),
        ("fp32 reference", f"{ref.get('metric')} {ref.get('accuracy')} % on {ref.get('samples')} samples"
                           + (f" ({ref['source']})" if ref.get("source") else "")),
        ("budget", f"{results.get('budget_pp')} pp accuracy drop"
                   + (f" {rule}" if (rule := budget_rule(results)) else "")),
        ("limits", ", ".join(f"{k} {v}" for k, v in limits.items() if v is not None) or None),
    ])


def _verdict(results: dict[str, Any]) -> str:
    gate = results.get("gate") or {}
    regressed = [str(r) for _, row in _runs(results) for r in row.get("regressions") or []]
    extra = ("<h3 class=\"fail\">regressions</h3><ul>" + "".join(f"<li>{escape(r)}</li>" for r in regressed)
             + "</ul>") if regressed else ""
    # The run to ship sits under the verdict: with "ship what passed" a failed gate may still
    # recommend a run, and a passed one says which of its runs to use.
    rec = f'<p id="recommended"><strong>{escape(line)}</strong></p>' if (line := recommended_line(results)) else ""
    if gate.get("passed"):
        return '<h2 class="pass">gate: PASSED</h2>' + rec + extra
    items = "".join(f"<li>{escape(str(r))}</li>" for r in gate.get("reasons") or [])
    return f'<h2 class="fail">gate: FAILED</h2><ul>{items}</ul>' + rec + extra


def _devices(results: dict[str, Any]) -> str:
    out = ["<h2>devices</h2>"]
    for dev in results.get("devices", []):
        probe = dev.get("probe") or dev.get("device_info") or {}
        dep = dev.get("deploy") or {}
        out.append(f"<h3>{escape(str(dev['device']))}</h3>")
        out.append(_dl([(k, v) for k, v in probe.items() if not isinstance(v, (dict, list))]
                       + [("conditions", conditions_line(dev)),
                          ("release", dep.get("release_id")), ("bytes moved", dep.get("bytes_moved")),
                          ("rolled back to", dev.get("rolled_back_to") if dev.get("rolled_back") else None),
                          ("error", dev.get("error"))]))
        slow = slower_lines(dev)
        out.append("<ul>" + "".join(f'<li class="fail">{escape(line)}</li>' for line in slow) + "</ul>" if slow else "")
    return "".join(out)


def _interval(row: dict[str, Any]) -> str:
    iv = row.get("accuracy_drop_interval")
    if not iv:  # a metric without one under accuracy.decision point says so (report.interval_note)
        return "none (bootstrap only under upper_bound)" if row.get("accuracy_drop_interval_note") else "-"
    return f"[{iv['low_pp']:+.2f}, {iv['high_pp']:+.2f}] n={iv['n']}"


def _cv(device: str, row: dict[str, Any], timings: Timings) -> str:
    """The timings' coefficient of variation (raw timings, else the agent's stdev / mean), flagged
    "unstable" over the default ``validation.max_cv``: its ratios are not to be trusted."""
    raw = timings.get(f"{device}/{row.get('id')}")
    lat = row.get("latency_ms") or {}
    if raw is not None and len(raw) > 1:
        cv = coefficient_of_variation(raw)
    elif lat.get("mean") and lat.get("stdev") is not None:
        cv = float(lat["stdev"]) / float(lat["mean"])
    else:
        return "-"
    return "-" if cv is None else f"{cv:.2f}" + (" unstable" if cv > MAX_CV else "")


def _table(results: dict[str, Any], timings: Timings | None = None) -> str:
    after = COLUMNS.index("drop pp") + 1  # the interval beside the drop it bounds
    named = columns(results)  # the accuracy and drop columns named for the metric
    cols = (*named[:after], "drop 95 % interval", *named[after:])
    at = COLUMNS.index("CV")
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    runs = _runs(results)
    for cells in rows(results):
        device, row = runs.pop(0) if cells[-1] != "ERROR" and runs else ("", {})
        if row and (row.get("latency_ms") or {}).get("cv") is None:  # results from before the agent's CV
            cells[at] = _cv(device, row, timings or {})
        cells = [*cells[:after], _interval(row), *cells[after:]]
        cls = "" if cells[-1] == "pass" else ' class="fail"'
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return f"<h2>runs</h2><table><tr>{head}</tr>{''.join(body)}</table>"


def _calibration(results: dict[str, Any]) -> str:
    out = []
    for device, r in _runs(results):
        cal = r.get("calibration") or {}
        if not cal.get("method"):
            continue
        lines = [f"calibration <code>{escape(str(cal['method']))}</code>"
                 + (f" ({escape(str(cal['reason']))})" if cal.get("reason") else "")]
        kept = cal.get("fallback_layers") or []
        if kept:
            lines.append("kept in float: " + ", ".join(f"<code>{escape(str(k.get('name', k)))}</code>" for k in kept))
        if cal.get("budget_met") is False:
            lines.append("budget not met: " + escape(str(cal.get("budget_reason") or "see the calibration report")))
        worst = cal.get("worst_tensors") or []
        if worst:
            cells = "".join(f"<tr><td>{escape(str(t['tensor']))}</td><td>{float(t['sqnr_db']):.1f}</td></tr>" for t in worst)
            lines.append("lowest per-tensor SQNR vs fp32 (holdout; where the int8 error enters):"
                         f"<table><tr><th>tensor</th><th>SQNR dB</th></tr>{cells}</table>")
        out.append(f"<h3>{escape(device)} {escape(str(r['id']))}</h3><p>" + "<br>".join(lines) + "</p>")
    return "<h2>where INT8 lost accuracy</h2>" + "".join(out) if out else ""


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _history(history: list[dict[str, Any]] | None) -> str:
    """The last nights, newest first: each run's accuracy and p50 (the trend plot is with the plots)."""
    data = series(history or [])
    nights = sorted({when for points in data.values() for when, *_ in points}, reverse=True)[:HISTORY_NIGHTS]
    if not nights:
        return ""
    cell = {(key, when): (acc, p50, ok) for key, points in data.items() for when, acc, p50, ok in points}
    head = "<tr><th>run</th>" + "".join(f"<th>{escape(n[:16])}</th>" for n in nights) + "</tr>"
    body = []
    for key in sorted(data):
        tds = []
        for when in nights:
            acc, p50, ok = cell.get((key, when), (None, None, True))
            text = "-" if acc is None and p50 is None else f"{_or_dash(acc)} % / {_or_dash(p50)} ms"
            tds.append(("<td>" if ok else '<td class="fail">') + f"{escape(text)}</td>")
        body.append(f"<tr><td>{escape(key)}</td>{''.join(tds)}</tr>")
    return f"<h2>history (accuracy / p50, newest first)</h2><table>{head}{''.join(body)}</table>"


def _plots(results: dict[str, Any], timings: Timings | None, history: list[dict[str, Any]] | None = None) -> str:
    images = plots(results, timings, history)
    if isinstance(images, str):
        return f"<h2>plots</h2><p>{escape(images)}</p>"
    return "<h2>plots</h2>" + "".join(f'<img id="plot-{name}" alt="{name} plot" src="data:image/png;base64,{b64}">'
                                      for name, b64 in images.items() if b64)


def report_html(results: dict[str, Any], timings: Timings | None = None,
                history: list[dict[str, Any]] | None = None) -> str:
    """The whole report as one HTML document; ``history`` (the nightly's entries) adds the trend."""
    title = f"edgeship: {results.get('spec')} on {results.get('target')}"
    body = "".join([f"<h1>{escape(title)}</h1>", _header(results), _verdict(results), _devices(results),
                    _table(results, timings), _calibration(results), _history(history), _plots(results, timings, history)])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def write_html(path: Path, results: dict[str, Any], timings: Timings | None = None,
               history: list[dict[str, Any]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(results, timings, history), encoding="utf-8")
    return path
