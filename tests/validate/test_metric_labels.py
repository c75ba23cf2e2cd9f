"""Reports name the accuracy column for the results' metric (issue 13): top1 %, mAP, a user
metric's name; the drop in percentage points for a % metric, in the metric's points otherwise, the
rise for a lower-is-better one; the same names in report.md, report.html, the console and JUnit."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from pipeline.validate.html import report_html
from pipeline.validate.junit import junit_xml
from pipeline.validate.report import markdown, print_report
from tests.validate.helpers import results, row


def _doc(metric: str, higher: bool) -> dict:
    doc = results([("local", [row("onnxruntime", "fp32", 98.0), row("onnxruntime", "int8", 97.5)])])
    doc["reference"].update(metric=metric, higher_is_better=higher)
    return doc


@pytest.mark.parametrize("metric, higher, label, drop", [
    ("top1", True, "top1 %", "drop pp"), ("map", True, "mAP", "drop"), ("mae", False, "mae", "rise (drop)"),
])
def test_columns_are_named_for_the_metric(metric: str, higher: bool, label: str, drop: str) -> None:
    doc = _doc(metric, higher)
    header = next(ln for ln in markdown(doc).splitlines() if ln.startswith("| device"))
    assert f"| {label} | {drop} |" in header and "accuracy %" not in header
    html = report_html(doc)
    assert f"<th>{label}</th><th>{drop}</th>" in html and "<th>accuracy %</th>" not in html
    out = io.StringIO()
    print_report(doc, Console(file=out, width=200))  # not a terminal: the plain table
    head = next(ln for ln in out.getvalue().splitlines() if ln.startswith("device"))
    assert re.findall(r"\S+(?: \S+)*", head)[4:6] == [label, drop]
    summary = ET.fromstring(junit_xml([doc])).find(".//testcase/system-out").text
    assert summary.startswith(f"{label.split()[0]} 98.0" + (" %" if label.endswith("%") else ""))
    assert ("pp" if label.endswith("%") else "points") in summary.split(",")[1]


def test_a_run_without_a_drop_interval_says_why() -> None:
    """map or a user metric under accuracy.decision point: no interval, and the reports say why."""
    from pipeline.validate.scoring import NO_INTERVAL

    doc = _doc("map", True)
    note = NO_INTERVAL.format(metric="map", evaluations=400)
    for r in doc["devices"][0]["runs"]:
        r["accuracy_drop_interval"], r["accuracy_drop_interval_note"] = None, note
    assert note in markdown(doc).splitlines()
    assert "none (bootstrap only under upper_bound)" in report_html(doc)
    assert "none (bootstrap" not in report_html(_doc("map", True))  # runs with no note keep "-"
