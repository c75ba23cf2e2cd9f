"""JUnit XML from results documents, so CI systems show each run's gate natively.

One ``<testsuite>`` per results document (a spec on a target), one ``<testcase>`` per device x
backend x precision. A run that fails its gate is a ``<failure>`` carrying the gate's reasons
(a failure on the device included: decisions.md counts it as a failed gate) and the run's
``regressions`` (the nightly's, against the last good run); a device that could not be measured at
all is one ``<error>`` case, as it is an environment failure, not a verdict.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from pipeline.validate.report import metric_label


def _summary(row: dict[str, Any], label: str = "accuracy %") -> str:
    """One run's numbers; ``label`` the metric's column name (report.metric_label: its name and unit)."""
    lat = row.get("latency_ms") or {}
    name, _, unit = label.partition(" ")
    parts = [f"{name} {row.get('accuracy')}" + (f" {unit}" if unit else ""),
             f"drop {row.get('accuracy_drop_pp')} " + ("pp" if unit == "%" else "points"),
             f"p50 {lat.get('p50')} ms", f"p90 {lat.get('p90')} ms", f"peak RSS {row.get('peak_rss_mb')} MB",
             f"size {row.get('artifact_bytes')} bytes"]
    iv = row.get("accuracy_drop_interval")
    if iv:
        parts.insert(2, f"95 % interval [{iv.get('low_pp')}, {iv.get('high_pp')}] pp (n {iv.get('n')})")
    return ", ".join(parts)


def _run_case(suite: ET.Element, classname: str, row: dict[str, Any], label: str) -> bool:
    """Append one run's test case; True when it failed."""
    case = ET.SubElement(suite, "testcase", classname=classname, name=f"{row['backend']} {row['precision']}")
    reasons = list((row.get("gate") or {}).get("reasons") or [])
    passed = bool((row.get("gate") or {}).get("passed"))
    reasons += list(row.get("regressions") or [])
    if not passed and not reasons:
        reasons = [f"{row['id']}: gate failed"]
    if reasons:
        failure = ET.SubElement(case, "failure", message=reasons[0], type="gate")
        failure.text = "\n".join(reasons)
    ET.SubElement(case, "system-out").text = _summary(row, label)
    return bool(reasons)


def _suite(root: ET.Element, results: dict[str, Any]) -> None:
    spec, target = results.get("spec", "?"), results.get("target", "?")
    suite = ET.SubElement(root, "testsuite", name=f"{spec} on {target}")
    tests = failures = errors = 0
    for dev in results.get("devices", []):
        device = str(dev.get("device"))
        classname = f"edgeship.{spec}.{target}.{device}"
        if dev.get("error") and not dev.get("runs"):
            case = ET.SubElement(suite, "testcase", classname=classname, name="device")
            ET.SubElement(case, "error", message=str(dev["error"]), type="device").text = str(dev["error"])
            tests, errors = tests + 1, errors + 1
            continue
        for row in dev.get("runs", []):
            tests += 1
            failures += _run_case(suite, classname, row, metric_label(results))
    if results.get("error") and not results.get("devices"):  # nothing reached a device (build error)
        case = ET.SubElement(suite, "testcase", classname=f"edgeship.{spec}.{target}", name="build")
        ET.SubElement(case, "error", message=str(results["error"]), type="build").text = str(results["error"])
        tests, errors = tests + 1, errors + 1
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    if results.get("deploy_seconds") is not None:
        suite.set("time", str(results["deploy_seconds"]))


def junit_xml(documents: Sequence[dict[str, Any]]) -> str:
    """The JUnit XML text for one or more results documents."""
    root = ET.Element("testsuites", name="edgeship")
    for results in documents:
        _suite(root, results)
    for key in ("tests", "failures", "errors"):
        root.set(key, str(sum(int(s.get(key, "0")) for s in root)))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: Path, documents: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junit_xml(documents), encoding="utf-8")
    return path
