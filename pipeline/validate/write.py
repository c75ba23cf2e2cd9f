"""The files every deploy, validate and nightly pair leaves in its output folder.

``results.json`` (machine-readable), ``report.md`` and ``report.html`` (people), written the same
way by the CLI and the nightly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.validate.timings import TIMINGS_FILE


def write_reports(results: dict[str, Any], out_dir: Path, history: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write results.json, report.md and report.html into ``out_dir``; returns their paths.
    ``history`` (the nightly's entries, tonight's included) adds the trend to report.html."""
    from pipeline.validate.html import write_html
    from pipeline.validate.report import markdown
    from pipeline.validate.sidefiles import save

    out_dir.mkdir(parents=True, exist_ok=True)
    doc, sides = split_sides(results)  # raw timings and outputs go to side files, named in the document
    written = [out_dir / "results.json", out_dir / "report.md"]
    side_paths = save(out_dir, sides)
    written[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    written[1].write_text(markdown(doc))
    written.append(write_html(out_dir / "report.html", doc, sides.get(TIMINGS_FILE, {}), history))
    return written + side_paths


def split_sides(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The document without its large arrays (the raw timings, the raw outputs) and those arrays,
    by side file (pipeline/validate/sidefiles.py)."""
    from pipeline.validate.outputs_file import OUTPUTS
    from pipeline.validate.sidefiles import split
    from pipeline.validate.timings import TIMINGS

    return split(results, (TIMINGS, OUTPUTS))
