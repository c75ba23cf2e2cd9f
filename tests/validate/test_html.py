"""report.html: its sections from a results document, and its plots decoded by a real browser
(headless Chromium from Debian's packages; the test skips with that reason where it is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.validate.html import plots, report_html, write_html
from pipeline.validate.timings import row_timings
from tests.validate.helpers import raw_timings, results, row

CALIBRATION = {"method": "entropy", "reason": "lowest holdout drop", "budget_met": False,
               "budget_reason": "holdout drop 1.40 pp > 1.00 pp", "fallback_layers": [{"name": "conv1"}],
               "per_layer_sqnr": [{"tensor": "conv2_out", "sqnr_db": 12.3}, {"tensor": "fc1", "sqnr_db": 22.0}]}


def _doc() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    runs = [row("onnxruntime", "fp32", 98.0, p90=1.0, size=96_000, seed=1),
            row("onnxruntime", "int8", 96.5, p90=0.6, size=32_000, seed=2, calibration=CALIBRATION),
            row("tflite", "int8", 97.6, p90=9.0, seed=3)]
    runs[1]["accuracy_drop_interval"] = {"drop_pp": 1.5, "low_pp": 0.9, "high_pp": 2.2, "n": 1500}
    runs[2]["latency_ms"].update(mean=8.0, stdev=3.2)  # no raw timings: CV 3.2 / 8 = 0.40 > 0.15
    doc = results([("local", runs)], max_latency_p90_ms=5.0, device_error="connection refused (port 2222)")
    # raw timings for two runs; the third falls back to the agent's percentiles
    return doc, {"local/onnxruntime-fp32": raw_timings(1.0, 1), "local/onnxruntime-int8": raw_timings(0.6, 2)}


def _history(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Three nights of the nightly's history: int8 drifts down 0.4 pp a night and gets slower."""
    nights = []
    for i, when in enumerate(("2026-12-01T02:00:00Z", "2026-12-02T02:00:00Z", "2026-12-03T02:00:00Z")):
        runs = [{"id": "onnxruntime-int8", "accuracy": round(97.3 - 0.4 * i, 2), "latency_ms": {"p50": 0.5 + 0.1 * i},
                 "gate": {"passed": i < 2, "reasons": []}}]
        nights.append({"when": when, "devices": [{"device": "local", "runs": runs}]})
    return nights


def test_report_history_table_and_trend() -> None:
    doc, timings = _doc()
    page = report_html(doc, timings, _history(doc))
    assert "history (accuracy / p50, newest first)" in page
    # newest first; the third night failed its gate and is marked
    assert page.index("2026-12-03T02:00") < page.index("2026-12-01T02:00")
    assert '<td class="fail">96.5 % / 0.7 ms</td>' in page and "<td>97.3 % / 0.5 ms</td>" in page
    assert re.findall(r'id="plot-(\w+)"', page) == ["latency", "accuracy", "size", "trend"]
    assert "plot-trend" not in report_html(doc, timings, _history(doc)[:1])  # one night is no trend


def test_report_sections() -> None:
    doc, timings = _doc()
    page = report_html(doc, timings)
    for text in ("edgeship: mnist-cnn on lab", "<dt>spec</dt><dd>mnist-cnn</dd>", "<dt>target</dt><dd>lab</dd>",
                 "<dt>release</dt><dd>" + "ab" * 32, "top1 98.0 % on 1500 samples", "1.0 pp accuracy drop",
                 "gate: FAILED", "onnxruntime-int8: accuracy drop 1.50 pp exceeds the budget 1.00 pp",
                 "<dt>arch</dt><dd>x86_64</dd>", "connection refused (port 2222)", "[+0.90, +2.20] n=1500",
                 "where INT8 lost accuracy", "<code>conv1</code>", "<td>conv2_out</td><td>12.3</td>",
                 "holdout drop 1.40 pp &gt; 1.00 pp"):
        assert text in page, text
    assert len(re.findall(r'<tr class="fail">', page)) == 3  # int8 over budget, tflite too slow, the device
    # CV: raw timings drawn with sigma 0.05 (CV ~0.05); tflite from the agent's stdev / mean
    assert "<td>0.40 unstable</td>" in page and len(re.findall(r"<td>0\.0[4-6]</td>", page)) == 2
    assert re.findall(r'id="plot-(\w+)"', page) == ["latency", "accuracy", "size"]
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_report_without_matplotlib_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    doc, _ = _doc()
    assert plots(doc) == "plots need matplotlib: pip install 'edgeship[report]'"
    page = report_html(doc)
    assert "plots need matplotlib" in page and "<img" not in page and "gate: FAILED" in page


def test_timings_side_file(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "timings.npz", **{"local/onnxruntime-fp32": np.array([1.0, 2.0])})
    got = row_timings({"timings_file": "timings.npz"}, tmp_path)
    assert list(got) == ["local/onnxruntime-fp32"] and got["local/onnxruntime-fp32"].tolist() == [1.0, 2.0]
    assert row_timings({}, tmp_path) == {}


# Written into a copy of the report only: after load, each image's decoded size lands in the DOM.
PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
         "img.setAttribute('data-decoded', img.naturalWidth + 'x' + img.naturalHeight); });</script>")


def test_plots_decode_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    doc, timings = _doc()
    page = write_html(tmp_path / "report.html", doc, timings, _history(doc))
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    decoded = dict(re.findall(r'<img id="plot-(\w+)"[^>]*data-decoded="(\d+x\d+)"', out.stdout))
    assert set(decoded) == {"latency", "accuracy", "size", "trend"}, out.stdout[-2000:]
    for name, size in decoded.items():
        w, h = (int(v) for v in size.split("x"))
        assert w > 100 and h > 100, f"plot {name} decoded as {size}"


def test_report_names_the_recommended_run() -> None:
    """Ship what passed: the run the release recommends is named under the verdict, or why none is."""
    doc, timings = _doc()
    doc["recommended"] = {"run": "onnxruntime-fp32", "backend": "onnxruntime", "precision": "fp32",
                          "policy": "fastest", "p90_ms": 1.0, "artifact_bytes": 96_000, "accuracy": 98.0}
    page = report_html(doc, timings)
    assert '<p id="recommended"><strong>recommended: onnxruntime-fp32 (fastest: p90 ' in page
    assert page.index("gate: FAILED") < page.index('id="recommended"') < page.index("<h2>runs</h2>")
    doc["recommended"] = None
    assert "recommended: none (no run passed the gate on every device)" in report_html(doc, timings)
    del doc["recommended"]  # results from before ship-what-passed say nothing
    assert 'id="recommended"' not in report_html(doc, timings)
