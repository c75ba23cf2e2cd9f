"""An int8 run slower than its backend's fp32 on the same device is called out, with why and what
to do, in every report; one whose p50 interval overlaps fp32's (noise) or that is faster is not."""

from __future__ import annotations

from typing import Any

from pipeline.validate.html import report_html
from pipeline.validate.report import markdown, slower_lines
from tests.validate.helpers import results, row


def _timed(r: dict[str, Any], p50: float, half: float) -> dict[str, Any]:
    r["latency_ms"].update(p50=p50, p50_low=p50 - half, p50_high=p50 + half)
    return r


def _doc(int8_p50: float, half: float = 0.05, kept: int = 20) -> dict[str, Any]:
    cal = {"method": "percentile", "fallback_layers": [{"name": f"conv{i}"} for i in range(kept)]}
    return results([("local", [_timed(row("onnxruntime", "fp32", 98.0), 3.0, half),
                               _timed(row("onnxruntime", "int8", 97.9, calibration=cal), int8_p50, half),
                               _timed(row("tflite", "fp32", 98.0), 3.2, half),
                               _timed(row("tflite", "int8", 97.9), 2.2, half)])])


def test_slower_int8_is_named_with_its_ratio_and_the_fallback_behind_it() -> None:
    doc = _doc(int8_p50=3.6)
    lines = slower_lines(doc["devices"][0])
    assert len(lines) == 1  # tflite int8 is faster than tflite fp32: nothing to say
    line = lines[0]
    assert line.startswith("local onnxruntime-int8: SLOWER than onnxruntime fp32 (0.83x, p50 3.600 vs 3.000 ms)")
    assert "20 float layer(s) from the calibration fallback" in line and "ship onnxruntime fp32" in line
    assert f"- {line}" in markdown(doc)
    assert "SLOWER than onnxruntime fp32 (0.83x" in report_html(doc, {})


def test_no_fallback_says_the_kernels_are_the_reason() -> None:
    line = slower_lines(_doc(int8_p50=3.6, kept=0)["devices"][0])[0]
    assert "its int8 kernels are not faster than the float ones here; ship onnxruntime fp32" in line


def test_fp16_slower_than_fp32_says_size_is_all_it_buys() -> None:
    doc = results([("local", [_timed(row("onnxruntime", "fp32", 98.0), 3.0, 0.05),
                              _timed(row("onnxruntime", "fp16", 98.0), 4.9, 0.05)])])
    assert slower_lines(doc["devices"][0]) == [
        "local onnxruntime-fp16: SLOWER than onnxruntime fp32 (0.61x, p50 4.900 vs 3.000 ms): no fp16 arithmetic "
        "pays on this device for onnxruntime: ship onnxruntime fp32 on this device unless size matters"]


def test_overlapping_intervals_are_noise_and_say_nothing() -> None:
    doc = _doc(int8_p50=3.08, half=0.1)  # 2.98-3.18 overlaps 2.9-3.1
    assert slower_lines(doc["devices"][0]) == []
    assert "SLOWER" not in markdown(doc) and "SLOWER" not in report_html(doc, {})
