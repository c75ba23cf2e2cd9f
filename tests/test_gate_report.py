"""Gate rules, the report and the nightly regression rule, on result rows built in code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.nightly import last_good, regressions
from pipeline.spec import PipelineSpec, TargetSpec
from pipeline.validate.gate import budget_pp, check_run, combine, run_row
from pipeline.validate.report import markdown, print_report


def _spec(budget: float = 1.0) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "t", "model": {"factory": "a:b"}, "input": {"shape": [1, 4]},
        "calibration": {"source": {"kind": "python", "callable": "a:b"}},
        "evaluation": {"source": {"kind": "python", "callable": "a:b"}},
        "accuracy": {"max_drop_pp": budget}})


def _target(**limits) -> TargetSpec:
    return TargetSpec.model_validate({"name": "d", "arch": "x86_64", "builds": [{"backend": "onnxruntime"}],
                                      "limits": limits, "hardware": {"tdp_w": 5.0}})


def _row(acc: float, p90: float = 1.0, rss: float = 100.0, size: int = 1000, error: str | None = None) -> dict:
    raw = {"accuracy": acc, "top1_agreement": 99.0, "sqnr_db": 30.0, "peak_rss_mb": rss, "baseline_rss_mb": 40.0,
           "latency_ms": {"p50": 0.5, "p90": p90, "p99": 2.0}, "error": error}
    meta = {"id": "onnxruntime-int8", "backend": "onnxruntime", "precision": "int8", "artifact_bytes": size,
            "artifact_sha256": "0" * 64, "conversion": {}}
    return run_row(raw, meta, {"accuracy": 98.0}, "top1", 5.0)


def test_row_fields_and_energy_estimate() -> None:
    row = _row(97.5)
    assert row["accuracy_drop_pp"] == pytest.approx(0.5)
    assert row["model_rss_mb"] == pytest.approx(60.0)
    assert row["energy_mj_per_inference_est"] == pytest.approx(2.5)  # 5 W x 0.5 ms


def test_budget_is_the_tighter_of_spec_and_target() -> None:
    assert budget_pp(_spec(1.0), _target()) == 1.0
    assert budget_pp(_spec(1.0), _target(max_accuracy_drop_pp=0.3)) == 0.3
    assert budget_pp(_spec(0.2), _target(max_accuracy_drop_pp=0.3)) == 0.2


@pytest.mark.parametrize("row,limits,needle", [
    (dict(acc=96.5), {}, "exceeds the budget"),
    (dict(acc=98.0, p90=30.0), {"max_latency_p90_ms": 20}, "latency p90"),
    (dict(acc=98.0, rss=700.0), {"max_memory_mb": 512}, "peak memory"),
    (dict(acc=98.0, size=3 * 2**20), {"max_artifact_mb": 2}, "artifact"),
    (dict(acc=98.0, error="exit 139: Segmentation fault"), {}, "failed on the device"),
])
def test_gate_failures_name_the_reason(row, limits, needle) -> None:
    gate = check_run(_row(**row), _spec(), _target(**limits))
    assert gate["passed"] is False and any(needle in r for r in gate["reasons"])


def test_gate_passes_within_limits() -> None:
    gate = check_run(_row(97.6, p90=10.0, rss=300.0), _spec(), _target(max_latency_p90_ms=20, max_memory_mb=512))
    assert gate == {"passed": True, "reasons": []}


def test_fidelity_with_a_tie_margin_is_gated_on_agreement_within_ties() -> None:
    meta = {"id": "tflite-int8", "backend": "tflite", "precision": "int8", "conversion": {}}
    raw = {"top1_agreement": 93.0, "agreement_within_ties": 98.5, "sqnr_db": 25.0, "latency_ms": {}}
    row = run_row(raw, meta, {"accuracy": 100.0, "tie_margin": 0.02}, "fidelity", None)
    assert row["accuracy"] == 98.5 and row["accuracy_drop_pp"] == pytest.approx(1.5)
    assert row["top1_agreement"] == 93.0  # the strict number stays in the results
    strict = run_row({k: v for k, v in raw.items() if k != "agreement_within_ties"}, meta, {"accuracy": 100.0},
                     "fidelity", None)
    assert strict["accuracy_drop_pp"] == pytest.approx(7.0)
    assert check_run(strict, _spec(5.0), _target())["passed"] is False
    assert check_run(row, _spec(5.0), _target())["passed"] is True


def test_calibration_that_missed_its_budget_fails_the_gate() -> None:
    row = _row(97.9)
    row["calibration"] = {"method": "auto", "budget_met": False}
    assert check_run(row, _spec(), _target())["passed"] is False


def test_combine_requires_every_gate_and_something_measured() -> None:
    assert combine([])["passed"] is False
    assert combine([{"passed": True, "reasons": []}, {"passed": False, "reasons": ["x"]}]) == {"passed": False, "reasons": ["x"]}


def _results(acc: float, passed: bool = True) -> dict:
    row = _row(acc)
    row["gate"] = {"passed": passed, "reasons": []}
    return {"spec": "t", "target": "d", "reference": {"metric": "top1", "accuracy": 98.0, "samples": 10},
            "budget_pp": 1.0, "devices": [{"device": "d", "runs": [row], "deploy": {"bytes_moved": 0}}],
            "gate": {"passed": passed, "reasons": []}}


def test_report_renders_every_run(capsys) -> None:
    from rich.console import Console

    res = _results(97.5)
    print_report(res, Console(width=200, force_terminal=False))
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "97.50" in out and "gate: PASSED" in out
    md = markdown(res)
    # a title, the line saying what the numbers belong to, then the table's head, rule and one row
    assert md.count("\n") == 7 and "| d | onnxruntime | int8 | - | 97.50 |" in md  # batch: - (not in these results)
    assert md.startswith(f"# {res['spec']} on {res['target']}\n") and "budget" in md.splitlines()[2]


def test_report_shows_where_int8_lost_accuracy(capsys) -> None:
    from rich.console import Console

    from pipeline.validate.gate import _calibration_summary

    table = [{"tensor": f"t{i}", "sqnr_db": 40.0 - i} for i in range(8)]
    conv = {"calibration": {"method": "mse", "reason": "best", "budget_met": False, "budget_reason": "drop 9 pp",
                            "fallback_layers": [{"name": "conv2"}], "per_layer_sqnr": table}}
    summary = _calibration_summary({"conversion": conv})
    assert [t["tensor"] for t in summary["worst_tensors"]] == ["t7", "t6", "t5", "t4", "t3"]
    res = _results(97.5)
    res["devices"][0]["runs"][0]["calibration"] = summary
    md = markdown(res)
    assert "calibration `mse` (best)" in md and "`conv2`" in md and "budget not met: drop 9 pp" in md
    assert "t7 33.0 dB, t6 34.0 dB" in md
    print_report(res, Console(width=300, force_terminal=False))
    assert "lowest SQNR: t7 33.0 dB, t6 34.0 dB, t5 35.0 dB" in capsys.readouterr().out


def test_nightly_regression_against_last_good(tmp_path: Path) -> None:
    hist = tmp_path / "h.jsonl"
    entries = [
        {"when": "day1", "devices": [{"device": "d", "runs": [{**_row(97.9), "gate": {"passed": True}}]}]},
        {"when": "day2", "devices": [{"device": "d", "runs": [{**_row(90.0), "gate": {"passed": False}}]}]},
    ]
    hist.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    good = last_good(hist)
    assert good["d/onnxruntime-int8"]["accuracy"] == 97.9  # the failed day2 run is not "good"
    assert regressions(_results(97.7), good, 0.5) == []
    found = regressions(_results(97.2), good, 0.5)
    assert len(found) == 1 and "0.70 pp below the last good run" in found[0]


def _night(when: str, acc: float, regressed: bool = False, passed: bool = True) -> dict:
    row = {**_row(acc), "gate": {"passed": passed}, "regressions": ["fell"] if regressed else []}
    return {"when": when, "devices": [{"device": "d", "runs": [row]}]}


def test_a_regressed_night_does_not_become_last_good(tmp_path: Path) -> None:
    """Its own gate passed, but it regressed: the next night still compares with day1, so a
    regression inside the budget stays red until it is fixed or accepted."""
    hist = tmp_path / "h.jsonl"
    hist.write_text("".join(json.dumps(e) + "\n" for e in (_night("day1", 97.9), _night("day2", 97.0, regressed=True))))
    assert last_good(hist)["d/onnxruntime-int8"]["when"] == "day1"
    assert len(regressions(_results(97.0), last_good(hist), 0.5)) == 1


def test_accept_makes_the_newest_regressed_runs_last_good(tmp_path: Path) -> None:
    from pipeline.nightly import accept

    hist = tmp_path / "h.jsonl"
    hist.write_text("".join(json.dumps(e) + "\n" for e in (_night("day1", 97.9), _night("day2", 97.0, regressed=True))))
    entry = accept(hist, [], "new calibration method, measured on the full set")
    assert entry["accepted"] == {"night": "day2", "runs": ["d/onnxruntime-int8"],
                                 "reason": "new calibration method, measured on the full set"}
    good = last_good(hist)
    assert good["d/onnxruntime-int8"]["when"] == "day2" and good["d/onnxruntime-int8"]["accuracy"] == 97.0
    assert regressions(_results(97.0), good, 0.5) == []
    # a later regressed night is measured against the accepted one, not day1
    with open(hist, "a") as fh:
        fh.write(json.dumps(_night("day3", 96.2, regressed=True)) + "\n")
    assert last_good(hist)["d/onnxruntime-int8"]["when"] == "day2"


@pytest.mark.parametrize("nights, runs, reason, needle", [
    ([], [], "why", "no nightly history to accept from"),
    (["ok"], [], "why", "has no regressed run to accept"),
    (["regressed"], ["tflite-int8"], "why", "--run tflite-int8: not a run of the night of day1"),
    (["gate-failed"], ["onnxruntime-int8"], "why", "--run onnxruntime-int8: not a run"),
    (["regressed"], [], "  ", "--reason is empty"),
])
def test_accept_refuses_what_it_cannot_accept(tmp_path: Path, nights: list[str], runs: list[str], reason: str,
                                              needle: str) -> None:
    from pipeline.errors import BadInput
    from pipeline.nightly import accept

    hist = tmp_path / "h.jsonl"
    make = {"ok": _night("day1", 97.9), "regressed": _night("day1", 97.0, regressed=True),
            "gate-failed": _night("day1", 90.0, regressed=True, passed=False)}
    if nights:
        hist.write_text("".join(json.dumps(make[n]) + "\n" for n in nights))
    before = hist.read_text() if hist.exists() else None
    with pytest.raises(BadInput, match=needle.replace("(", r"\(")):
        accept(hist, runs, reason)
    assert (hist.read_text() if hist.exists() else None) == before  # nothing appended
