"""Raw timings end to end on the host (issue 17): the side file beside results.json, the p50
interval, and the nightly's latency rule against the last good run and the pinned baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.nightly import regressions_by_run
from pipeline.validate.baseline import baseline_regressions, pin_results_file
from pipeline.validate.report import markdown
from pipeline.validate.stats import p50_interval
from pipeline.validate.timings import TIMINGS_FILE, latency_block, row_timings
from pipeline.validate.write import split_sides
from pipeline.validate.write import write_reports
from tests.validate.helpers import raw_timings, results, row


def _doc(scale: float = 1.0, seed: int = 0) -> dict:
    """A one-device results document whose rows carry raw timings (as deploy leaves them in memory)."""
    rows = [row("onnxruntime", "fp32", 98.0, seed=seed), row("onnxruntime", "int8", 97.9, seed=seed + 1)]
    for i, r in enumerate(rows):
        r["timings_ms"] = (raw_timings(1.0, seed + 10 + i) * scale).round(4).tolist()
    return results([("local", rows)])


def test_latency_block_adds_the_p50_interval_of_the_raw_timings() -> None:
    times = raw_timings(1.0, 3).tolist()
    block = latency_block({"latency_ms": {"p50": 0.9, "cv": 0.05}, "timings_ms": times})
    _, low, high = p50_interval(times)
    assert block["p50_low"] == round(low, 4) and block["p50_high"] == round(high, 4) and low < block["p50"] < high
    assert "p50_low" not in latency_block({"latency_ms": {"p50": 0.9}})  # no raw timings, no interval


def test_raw_timings_go_to_the_side_file_not_results_json(tmp_path: Path) -> None:
    doc = _doc()
    write_reports(doc, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["timings_file"] == TIMINGS_FILE
    assert all("timings_ms" not in r for d in written["devices"] for r in d["runs"])
    assert all("timings_ms" not in r for r in written["runs"])
    back = row_timings(written, tmp_path)
    assert set(back) == {"local/onnxruntime-fp32", "local/onnxruntime-int8"}
    np.testing.assert_allclose(back["local/onnxruntime-int8"], doc["runs"][1]["timings_ms"])
    assert "timings_ms" in doc["runs"][0], "the caller's document is left as it was"
    assert split_sides(results([("local", [row("onnxruntime", "fp32", 98.0)])]))[0].get("timings_file") is None


def test_nightly_latency_against_the_last_good_run() -> None:
    good = {f"local/{r['id']}": {**r, "when": "last night"} for r in _doc()["runs"]}
    slow = regressions_by_run(_doc(scale=1.3, seed=5), good, 0.5, 10.0)
    assert set(slow) == {"local/onnxruntime-fp32", "local/onnxruntime-int8"}
    assert all("slower than the last good run" in why[0] for why in slow.values())
    assert regressions_by_run(_doc(scale=1.02, seed=5), good, 0.5, 10.0) == {}  # jitter is not a regression
    assert regressions_by_run(_doc(scale=1.3, seed=5), good, 0.5, 50.0) == {}  # within the target's limit


def test_baseline_pin_keeps_raw_timings_and_catches_a_slowdown(tmp_path: Path) -> None:
    write_reports(_doc(), tmp_path / "out")
    pinned = json.loads(pin_results_file(tmp_path / "out" / "results.json", tmp_path / "b.json").read_text())
    assert len(pinned["runs"]["local/onnxruntime-fp32"]["timings_ms"]) == 100
    found = baseline_regressions(_doc(scale=1.3, seed=7), pinned, tolerance_pp=0.5)
    assert set(found) == {"local/onnxruntime-fp32", "local/onnxruntime-int8"} and "Mann-Whitney" in found[
        "local/onnxruntime-fp32"][0]
    assert baseline_regressions(_doc(scale=1.02, seed=7), pinned, tolerance_pp=0.5) == {}


def test_report_flags_an_unstable_run() -> None:
    doc = _doc()
    doc["runs"][0]["latency_ms"].update(cv=0.42, unstable=True)
    doc["runs"][1]["latency_ms"].update(cv=0.03, unstable=False)
    md = markdown(doc)
    assert "| 0.42 unstable |" in md and "| 0.03 |" in md and "| CV |" in md


def test_reports_say_under_which_conditions_the_device_was_measured() -> None:
    from pipeline.validate.html import report_html

    doc = _doc()
    doc["devices"][0]["conditions"] = {
        "before": {"loadavg": {"1m": 3.5}, "cpus": 2, "cpufreq": {"cpu0": {"governor": "powersave", "mhz": 800.0},
                                                                   "cpu1": {"governor": "powersave", "mhz": 1200.0}},
                   "thermal": [{"zone": "thermal_zone0", "temp_c": 50.0}]},
        "after": {"thermal": [{"zone": "thermal_zone0", "temp_c": 71.0}]},
        "flags": ["powersave governor", "load above cores"], "settle_ms": {"n": 10, "median": 41.2, "max": 95.0}}
    want = ("local: measured with governor powersave, 800-1200 MHz, max 71 C, load 3.50 on 2 cpus, "
            "each of 10 chunks after a wait for idle threads (median 41 ms, max 95); "
            "FLAGGED: powersave governor, load above cores")
    assert want in markdown(doc)
    assert "FLAGGED: powersave governor, load above cores" in report_html(doc)
    assert "measured with" not in markdown(_doc())  # no conditions reported: no line


def test_unstable_timings_are_not_compared_across_nights(tmp_path: Path) -> None:
    """A night measured under load says how busy the machine was: no latency verdict either way."""
    good = {f"local/{r['id']}": {**r, "when": "last night"} for r in _doc()["runs"]}
    slow = _doc(scale=1.3, seed=5)
    for r in slow["runs"]:
        r["latency_ms"].update(unstable=True, unstable_why=["load above cores"])
    assert regressions_by_run(slow, good, 0.5, 10.0) == {}
    write_reports(_doc(), tmp_path / "out")
    pinned = json.loads(pin_results_file(tmp_path / "out" / "results.json", tmp_path / "b.json").read_text())
    assert baseline_regressions(slow, pinned, tolerance_pp=0.5) == {}
    calm = _doc(scale=1.3, seed=5)  # the same slowdown, measured calmly: caught
    assert set(regressions_by_run(calm, good, 0.5, 10.0)) == {"local/onnxruntime-fp32", "local/onnxruntime-int8"}


def test_reports_show_measured_power_and_device_builds() -> None:
    doc = _doc()
    doc["runs"][0]["power"] = {"sensor": "ina3221:VDD_IN", "mean_w": 6.1, "p90_w": 6.4, "idle_w": 4.2,
                               "energy_mj_per_inference": 1.9, "window_s": 2.05}
    doc["runs"][1]["power"] = {"sensor": "rapl:package-0", "error": "energy_uj is readable by root only"}
    doc["runs"][1]["device_build"] = {"cached": True, "builder": "tensorrt 10.3 python", "seconds": 0.0}
    md = markdown(doc)
    assert ("- local onnxruntime-fp32: power 6.10 W (p90 6.40, idle 4.20 W) over 2.0 s, 1.900 mJ/inference "
            "above idle (ina3221:VDD_IN)") in md
    assert "power sensor rapl:package-0 not read: energy_uj is readable by root only" in md
    assert "local onnxruntime-int8: engine cached on the device (tensorrt 10.3 python)" in md
    assert "power" not in markdown(_doc())  # no sensor anywhere: no power lines


def test_nightly_catches_memory_and_size_growth_against_the_last_good_run() -> None:
    good = {f"local/{r['id']}": {**r, "when": "last night"} for r in _doc()["runs"]}
    tonight = _doc()
    tonight["runs"][0]["peak_rss_mb"] = 80.0 * 1.25  # rows are built at 80 MB
    tonight["runs"][1]["artifact_bytes"] = 40_000 * 2
    found = regressions_by_run(tonight, good, 0.5, 10.0)
    assert set(found) == {"local/onnxruntime-fp32", "local/onnxruntime-int8"}
    assert "peak RSS 100 MB is 25.0 % over the last good run's 80 MB" in found["local/onnxruntime-fp32"][0]
    assert "artifact 80000 bytes is 100.0 % over the last good run's 40000 bytes" in found["local/onnxruntime-int8"][0]
    assert regressions_by_run(_doc(), good, 0.5, 10.0) == {}
