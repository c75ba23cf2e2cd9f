"""The JUnit writer: parsed back with xml.etree, counts and the gate's reasons where CI shows them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.validate.junit import junit_xml, write_junit
from tests.validate.helpers import results, row


def _doc() -> dict:
    rows = [row("onnxruntime", "fp32", 98.0), row("onnxruntime", "int8", 96.5),  # drop 1.5 > budget 1.0
            row("tflite", "int8", 97.6, p90=9.0)]                                 # p90 over 5 ms
    return results([("local", rows)], max_latency_p90_ms=5.0, device_error="connection refused (port 2222)")


def test_junit_counts_and_gate_reasons(tmp_path: Path) -> None:
    path = write_junit(tmp_path / "ci" / "junit.xml", [_doc()])
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "2", "1")
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "mnist-cnn on lab" and suite.get("time") == "12.5"
    cases = {(c.get("classname"), c.get("name")): c for c in suite.findall("testcase")}
    assert set(cases) == {("edgeship.mnist-cnn.lab.local", "onnxruntime fp32"),
                          ("edgeship.mnist-cnn.lab.local", "onnxruntime int8"),
                          ("edgeship.mnist-cnn.lab.local", "tflite int8"),
                          ("edgeship.mnist-cnn.lab.sim-arm64", "device")}
    assert cases[("edgeship.mnist-cnn.lab.local", "onnxruntime fp32")].find("failure") is None
    fail = cases[("edgeship.mnist-cnn.lab.local", "onnxruntime int8")].find("failure")
    assert fail is not None
    assert fail.get("message") == "onnxruntime-int8: accuracy drop 1.50 pp exceeds the budget 1.00 pp"
    slow = cases[("edgeship.mnist-cnn.lab.local", "tflite int8")].find("failure")
    assert slow is not None and "latency p90 9.00 ms exceeds 5.0 ms" in (slow.text or "")
    err = cases[("edgeship.mnist-cnn.lab.sim-arm64", "device")].find("error")
    assert err is not None and err.get("message") == "connection refused (port 2222)"
    out = cases[("edgeship.mnist-cnn.lab.local", "onnxruntime int8")].findtext("system-out") or ""
    assert "top1 96.5 %" in out and "drop 1.5 pp" in out


def test_junit_regressions_and_several_documents() -> None:
    ok = results([("local", [row("ncnn", "int8", 97.9)])])
    assert ET.fromstring(junit_xml([ok]).split("\n", 1)[1]).get("failures") == "0"
    # the nightly's regression of a run that passed its own gate still fails its case
    ok["devices"][0]["runs"][0]["regressions"] = ["local/ncnn-int8: p50 30.2 % slower than the baseline"]
    root = ET.fromstring(junit_xml([ok, ok]).split("\n", 1)[1])
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "2", "0")
    messages = [f.get("message") for f in root.iter("failure")]
    assert messages == ["local/ncnn-int8: p50 30.2 % slower than the baseline"] * 2


def test_junit_build_error_is_an_error_case() -> None:
    # a nightly pair whose deploy raised before any device was measured
    entry = {"spec": "mnist-cnn", "target": "lab", "error": "model.onnx: not an ONNX file", "devices": []}
    root = ET.fromstring(junit_xml([entry]).split("\n", 1)[1])
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("1", "0", "1")
    err = root.find("testsuite/testcase[@name='build']/error")
    assert err is not None and err.get("message") == "model.onnx: not an ONNX file"
