"""The files every deploy, validate and nightly pair leaves in its output folder.

``results.json`` (machine-readable), ``report.md`` and ``report.html`` (people), written the same
way by the CLI and the nightly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_reports(results: dict[str, Any], out_dir: Path, history: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write results.json, report.md and report.html into ``out_dir``; returns their paths.
    ``history`` (the nightly's entries, tonight's included) adds the trend to report.html."""
    from pipeline.validate.html import write_html
    from pipeline.validate.report import markdown
    from pipeline.validate.outputs_file import save_outputs, split_outputs
    from pipeline.validate.timings import save_timings, split_timings

    out_dir.mkdir(parents=True, exist_ok=True)
    doc, timings = split_timings(results)  # raw timings go to a side file, named in the document
    doc, outputs = split_outputs(doc)  # so do the raw outputs the metric was computed from
    written = [out_dir / "results.json", out_dir / "report.md"]
    sides = [p for p in (save_timings(out_dir, timings), save_outputs(out_dir, outputs)) if p]
    written[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    written[1].write_text(markdown(doc))
    written.append(write_html(out_dir / "report.html", doc, timings, history))
    return written + sides
