"""The nightly workflow publishes what the nightly writes: parsed YAML, its paths matched against the
CLI's default output folder, the Makefile's --junit file and the per-pair layout of run_nightly."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import typer.main
import yaml

from pipeline.cli import app
from pipeline.nightly import REFERENCE_SPECS

ROOT = Path(__file__).resolve().parents[2]


def _published() -> list[str]:
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "nightly.yml").read_text())
    paths: list[str] = []
    for step in flow["jobs"]["nightly"]["steps"]:
        if str(step.get("uses", "")).startswith("actions/upload-artifact"):
            paths += [p.strip() for p in str(step["with"]["path"]).splitlines() if p.strip()]
    return paths


def test_workflow_publishes_the_reports_and_the_junit_file() -> None:
    published = _published()
    nightly = typer.main.get_command(app).commands["nightly"]  # type: ignore[attr-defined]
    out = Path(next(p.default for p in nightly.params if p.name == "out"))
    # run_nightly writes <out>/<spec>/<target>/report.html (tests/validate/test_nightly_outputs.py)
    report = (out / "mnist-cnn" / "local" / "report.html").as_posix()
    assert any(fnmatch.fnmatch(report, pattern) for pattern in published), (report, published)
    recipe = re.search(r"^nightly:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    junit = re.search(r"--junit (\S+)", recipe.group(1))
    assert junit is not None and junit.group(1) in published
    assert "build/history" in published


def test_workflow_runs_every_reference_workload_on_the_devices() -> None:
    """One leg per (spec, target), each keeping its own history: the matrix is the nightly's
    default spec list, and each leg's history cache key names its leg."""
    job = yaml.safe_load((ROOT / ".github" / "workflows" / "nightly.yml").read_text())["jobs"]["nightly"]
    matrix = job["strategy"]["matrix"]
    assert matrix["spec"] == list(REFERENCE_SPECS) and "sim-arm64" in matrix["target"]
    assert all((ROOT / "examples" / f"{name}.yaml").is_file() for name in matrix["spec"])
    history = next(s for s in job["steps"] if s.get("with", {}).get("path") == "build/history"
                   and "cache" in s["uses"])
    assert "${{ matrix.spec }}-${{ matrix.target }}" in history["with"]["key"]
    run = next(s["run"] for s in job["steps"] if s.get("name") == "nightly")
    assert "NIGHTLY_SPECS=examples/${{ matrix.spec }}.yaml" in run and "NIGHTLY_TARGETS=${{ matrix.target }}" in run
