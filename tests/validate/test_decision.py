"""accuracy.decision: point | upper_bound, on hand-computed paired intervals (issue 17).

n = 400 samples and a 1.00 pp budget throughout (one sample is 0.25 pp). The interval is exact and
conditional on the m = b + c discordant pairs: drop in 100 m (2 [p_lo, p_hi] - 1) / n, with
[p_lo, p_hi] the Clopper-Pearson interval of b of m. Its ends are checked here against the
binomial tails written out with math.comb, or in closed form where b = m: p_lo = (0.025)^(1 / m).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from pipeline.deploy import _device_result, _results
from pipeline.errors import SpecError
from pipeline.spec import PipelineSpec, TargetSpec, load_spec
from pipeline.validate.gate import check_run, combine, run_row
from pipeline.validate.html import report_html
from pipeline.validate.report import markdown, print_report
from pipeline.validate.stats import disagreement_interval, paired_drop_interval, samples_needed

ROOT = Path(__file__).resolve().parents[2]
N, BUDGET, FP32 = 400, 1.0, 98.0


def _spec(decision: str | None = None) -> PipelineSpec:
    accuracy: dict[str, Any] = {"max_drop_pp": BUDGET}
    if decision is not None:
        accuracy["decision"] = decision
    return PipelineSpec.model_validate({
        "name": "t", "model": {"factory": "a:b"}, "input": {"shape": [1, 4]},
        "calibration": {"source": {"kind": "python", "callable": "a:b"}},
        "evaluation": {"source": {"kind": "python", "callable": "a:b"}}, "accuracy": accuracy})


def _target() -> TargetSpec:
    return TargetSpec.model_validate({"name": "d", "arch": "x86_64", "builds": [{"backend": "onnxruntime"}]})


def _row(b: int, c: int, n: int = N, interval: bool = True) -> dict[str, Any]:
    """A gated run's row: the candidate wrong on b samples fp32 got right, right on c it got wrong."""
    raw = {"accuracy": FP32 - 100.0 * (b - c) / n, "latency_ms": {"p50": 0.5, "p90": 1.0}}
    meta = {"id": "onnxruntime-int8", "backend": "onnxruntime", "precision": "int8", "conversion": {}}
    row = run_row(raw, meta, {"accuracy": FP32}, "top1", None)
    if interval:
        row["accuracy_drop_interval"] = paired_drop_interval(b, c, n)
    return row


def _cdf(k: int, m: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(m, p), term by term."""
    return sum(math.comb(m, i) * p ** i * (1 - p) ** (m - i) for i in range(k + 1))


def _needed(reason: str) -> int:
    found = re.search(r"inconclusive: need about (\d+) samples", reason)
    assert found, reason
    return int(found.group(1))


def _at(b: int, c: int, size: int) -> dict[str, Any]:
    """The interval recomputed directly at ``size`` samples with the observed rates b / n, c / n."""
    return paired_drop_interval(round(b * size / N), round(c * size / N), size)


# ---- the hand-computed intervals the cases below rest on ---------------------------------------

def test_the_cases_intervals_by_hand() -> None:
    # b = 5, c = 2: drop 0.75 pp; the upper end solves P(X <= 5 | 7, p_hi) = 0.025 -> 1.62 pp
    iv = paired_drop_interval(5, 2, N)
    p_hi = (iv["high_pp"] * N / (100 * 7) + 1) / 2
    assert iv["drop_pp"] == 0.75 and _cdf(5, 7, p_hi) == pytest.approx(0.025, abs=1e-4)
    assert iv["high_pp"] == pytest.approx(1.62, abs=0.01) and iv["low_pp"] < BUDGET < iv["high_pp"]
    # b = 2, c = 2: drop 0; P(X <= 2 | 4, p_hi) = 0.025 -> 0.86 pp, within the budget
    iv = paired_drop_interval(2, 2, N)
    assert _cdf(2, 4, (iv["high_pp"] * N / 400 + 1) / 2) == pytest.approx(0.025, abs=1e-4)
    assert iv["high_pp"] == pytest.approx(0.86, abs=0.01)
    # b = 12, c = 0: drop 3 pp; p_lo = 0.025^(1/12): low = 3 (2 p_lo - 1) = 1.41 pp, over the budget
    assert paired_drop_interval(12, 0, N)["low_pp"] == pytest.approx(3 * (2 * 0.025 ** (1 / 12) - 1), abs=1e-4)
    # b = 10, c = 0: drop 2.5 pp but low = 2.5 (2 * 0.025^(1/10) - 1) = 0.96 pp, under the budget
    assert paired_drop_interval(10, 0, N)["low_pp"] == pytest.approx(2.5 * (2 * 0.025 ** 0.1 - 1), abs=1e-4)


# ---- point: today's rule, the default ----------------------------------------------------------

def test_point_is_the_default_and_ignores_the_interval() -> None:
    assert _spec().accuracy.decision == "point"
    # a straddling interval (b = 5, c = 2) passes on its point estimate exactly as before
    assert check_run(_row(5, 2), _spec(), _target()) == {"passed": True, "reasons": []}
    assert check_run(_row(5, 2, interval=False), _spec("point"), _target()) == {"passed": True, "reasons": []}
    # a failing one gives today's reason, word for word
    assert check_run(_row(12, 0), _spec(), _target())["reasons"] == [
        "onnxruntime-int8: accuracy drop 3.00 pp exceeds the budget 1.00 pp"]


# ---- upper_bound -------------------------------------------------------------------------------

def test_both_rules_pass_when_the_whole_interval_is_within_the_budget() -> None:
    for decision in ("point", "upper_bound"):
        assert check_run(_row(2, 2), _spec(decision), _target()) == {"passed": True, "reasons": []}


def test_both_rules_fail_when_the_whole_interval_is_over_the_budget() -> None:
    gate = check_run(_row(12, 0), _spec("upper_bound"), _target())
    assert gate["reasons"] == ["onnxruntime-int8: accuracy drop 3.00 pp exceeds the budget 1.00 pp with all of "
                               "its 95% interval [1.41, 3.00] pp (n=400)"]


def test_point_passes_upper_bound_is_inconclusive_with_an_honest_n() -> None:
    row = _row(5, 2)
    assert check_run(row, _spec("point"), _target())["passed"] is True
    gate = check_run(row, _spec("upper_bound"), _target())
    assert gate["passed"] is False and len(gate["reasons"]) == 1
    reason = gate["reasons"][0]
    assert reason.startswith("onnxruntime-int8: accuracy drop 0.75 pp, inconclusive: need about ")
    assert "[-0.73, 1.62] pp straddles the budget 1.00 pp" in reason
    need = _needed(reason)
    assert need == samples_needed(row["accuracy_drop_interval"], BUDGET)
    # at the suggested size, with the same discordance rates, the interval excludes the budget ...
    assert _at(5, 2, need)["high_pp"] <= BUDGET
    # ... at half of it (and at 95 % of it: "about") it does not
    assert _at(5, 2, need // 2)["high_pp"] > BUDGET and _at(5, 2, int(need * 0.95))["high_pp"] > BUDGET
    # the normal approximation of the same conditional interval, 1.96^2 1e4 4 beta gamma / (beta + gamma)
    # / gap^2 = 8,781, is in the same place
    beta, gamma = 5 / N, 2 / N
    assert 0.8 < need / (1.96 ** 2 * 1e4 * 4 * beta * gamma / (beta + gamma) / 0.25 ** 2) < 1.2


def test_a_point_over_the_budget_that_straddles_says_how_many_samples_confirm_it() -> None:
    row = _row(10, 0)  # drop 2.5 pp, interval [0.96, 2.50]
    assert check_run(row, _spec("point"), _target())["passed"] is False
    reason = check_run(row, _spec("upper_bound"), _target())["reasons"][0]
    need = _needed(reason)
    assert _at(10, 0, need)["low_pp"] > BUDGET and _at(10, 0, int(need * 0.95))["low_pp"] <= BUDGET


def test_fidelity_interval_is_recomputed_as_disagreements() -> None:
    # 6 disagreements of 400: drop 1.5 pp within a 2 pp budget, Clopper-Pearson upper end 3.24 pp
    iv = disagreement_interval(6, N)
    assert _cdf(6, N, iv["high_pp"] / 100) == pytest.approx(0.025, abs=1e-3)
    need = samples_needed(iv, 2.0)
    assert need is not None
    assert disagreement_interval(round(6 * need / N), need)["high_pp"] <= 2.0
    assert disagreement_interval(round(6 * need / 2 / N), need // 2)["high_pp"] > 2.0


def test_upper_bound_without_an_interval_fails_and_says_why() -> None:
    gate = check_run(_row(0, 0, interval=False), _spec("upper_bound"), _target())
    assert gate["passed"] is False and "needs the drop's interval" in gate["reasons"][0]


# ---- deploy gates with the interval ------------------------------------------------------------

def _release_data(tmp_path: Path) -> tuple[Path, list[int]]:
    """400 samples, 3 classes: fp32 wrong on 0-1 and 7-9, the candidate wrong on 2-6 and 7-9 (b = 5, c = 2)."""
    labels = np.arange(N) % 3
    fp32, cand = labels.copy(), labels.copy()
    fp32[[0, 1, 7, 8, 9]] = (labels[[0, 1, 7, 8, 9]] + 1) % 3
    cand[[2, 3, 4, 5, 6, 7, 8, 9]] = (labels[[2, 3, 4, 5, 6, 7, 8, 9]] + 1) % 3
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "reference.npy", (np.eye(3)[fp32] * 5.0).astype(np.float32), allow_pickle=False)
    np.save(data / "y.npy", labels.astype(np.int64), allow_pickle=False)
    return data, cand.tolist()


def test_deploy_attaches_the_interval_before_it_gates(tmp_path: Path) -> None:
    data, predictions = _release_data(tmp_path)
    manifest = {"provenance": {"reference": {"metric": "top1", "accuracy": 98.75, "samples": N}},
                "runs": [{"id": "onnxruntime-int8", "backend": "onnxruntime", "precision": "int8"}]}
    raw = {"results": [{"id": "onnxruntime-int8", "accuracy": 98.0, "predictions": predictions,
                        "latency_ms": {"p50": 0.5, "p90": 1.0}}]}
    result = _device_result(_spec("upper_bound"), _target(), "local", manifest, raw, {}, data)
    row = result["runs"][0]
    assert (row["accuracy_drop_interval"]["b"], row["accuracy_drop_interval"]["c"]) == (5, 2)
    assert "inconclusive: need about" in row["gate"]["reasons"][0] and result["gate"]["passed"] is False
    point = _device_result(_spec(), _target(), "local", manifest, raw, {}, data)
    assert point["gate"] == {"passed": True, "reasons": []} and "accuracy_drop_interval" in point["runs"][0]


# ---- the rule in results.json and the reports --------------------------------------------------

def _doc(decision: str) -> dict[str, Any]:
    spec, target = _spec(decision), _target()
    row = _row(5, 2)
    dev = {"device": "d", "runs": [row], "deploy": {"bytes_moved": 0}, "gate": combine([check_run(row, spec, target)])}
    built = SimpleNamespace(spec=spec, target=target, release_id="ab" * 32, reference_metric={
        "metric": "top1", "accuracy": FP32, "samples": N}, manifest={"provenance": {"model": {"analysis": {}}}}, events=[])
    return _results(built, [dev], 1.0)  # type: ignore[arg-type]


def test_results_and_reports_name_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc("upper_bound")
    assert doc["accuracy_decision"] == "upper_bound" and _doc("point")["accuracy_decision"] == "point"
    readme = (ROOT / "README.md").read_text()
    schema = readme[readme.index("## Results schema"):readme.index("## Benchmarks")]
    assert '"accuracy_decision":' in schema
    rule = "budget 1.0 pp on the upper end of each run's 95 % drop interval (accuracy.decision: upper_bound)"
    md = markdown(doc)
    assert f"gate FAILED, {rule}" in md and "- onnxruntime-int8: accuracy drop 0.75 pp, inconclusive: need about" in md
    assert "<dd>1.0 pp accuracy drop on the upper end" in report_html(json.loads(json.dumps(doc)))
    print_report(doc, Console(width=400, force_terminal=False))
    assert rule in " ".join(capsys.readouterr().out.split())  # the title wraps at the table's width


def test_point_reports_read_as_before() -> None:
    doc = _doc("point")
    without = {k: v for k, v in doc.items() if k != "accuracy_decision"}
    assert markdown(doc) == markdown(without) and "accuracy.decision" not in markdown(doc)
    assert "accuracy.decision" not in report_html(doc)


# ---- spec validation ---------------------------------------------------------------------------

def test_unknown_decision_is_one_line_naming_the_field_and_choices(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
    data["accuracy"]["decision"] = "median"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "field 'accuracy.decision'" in msg and "'point'" in msg and "'upper_bound'" in msg and "'median'" in msg
    data["accuracy"]["decision"] = "upper_bound"
    path.write_text(yaml.safe_dump(data))
    assert load_spec(path).accuracy.decision == "upper_bound"
