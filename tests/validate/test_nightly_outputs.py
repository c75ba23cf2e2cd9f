"""What the nightly leaves behind: each pair's reports, a run's regressions on its own row, one JUnit
file over every pair. The deploy is replaced by a results document built in code (the real
nightly deploy runs in tests/test_deploy_local.py); the spec, target, history and files are real."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline.deploy
from pipeline.nightly import run_nightly
from pipeline.validate.baseline import pack_outcomes, pin_results
from tests.validate.helpers import results, row

ROOT = Path(__file__).resolve().parents[2]


def _tonight(*_: Any, **__: Any) -> dict[str, Any]:
    doc = results([("local", [row("onnxruntime", "fp32", 98.0), row("onnxruntime", "int8", 97.5)])])
    doc["spec"], doc["target"] = "mnist-cnn", "local"
    return doc


def test_nightly_reports_regressions_and_junit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.deploy, "deploy", _tonight)
    history = tmp_path / "history"
    hist = history / "mnist-cnn" / "local.jsonl"
    hist.parent.mkdir(parents=True)
    # last good night: int8 at 98.3 %, tonight 97.5 % (inside the 1 pp budget, 0.8 pp below it)
    good = {"when": "2026-12-03T02:00:00Z", "devices": [{"device": "local", "runs": [
        {"id": "onnxruntime-int8", "accuracy": 98.3, "gate": {"passed": True, "reasons": []}}]}]}
    hist.write_text(json.dumps(good) + "\n")
    junit = tmp_path / "ci" / "nightly.xml"
    summary = run_nightly([ROOT / "examples" / "mnist.yaml"], ["local"], tmp_path / "out", history, 0.5,
                          log=lambda _: None, junit=junit)
    assert summary["passed"] is False
    pair_dir = tmp_path / "out" / "mnist-cnn" / "local"
    doc = json.loads((pair_dir / "results.json").read_text())
    runs = {r["id"]: r for r in doc["devices"][0]["runs"]}
    assert runs["onnxruntime-fp32"]["regressions"] == []
    (why,) = runs["onnxruntime-int8"]["regressions"]
    assert why.startswith("local/onnxruntime-int8: accuracy 97.50% is 0.80 pp below the last good run")
    page = (pair_dir / "report.html").read_text()
    assert (pair_dir / "report.md").is_file() and "<img" in page
    assert "regressions</h3><ul><li>local/onnxruntime-int8: accuracy 97.50% is 0.80 pp below" in page
    # the trend covers last night (from the history) and tonight (appended before the report)
    assert 'id="plot-trend"' in page and "2026-12-03T02:00" in page and '<td class="fail">97.5 %' in page
    # tonight's entry says which metric its figures are in (the spec's), last night's did not
    assert [json.loads(ln).get("metric") for ln in hist.read_text().splitlines()] == [None, "top1"]
    root = ET.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures")) == ("2", "1")
    assert [f.get("message") for f in root.iter("failure")] == [why]


def test_nightly_compares_with_the_pinned_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_ok = np.zeros(1500, dtype=bool)
    base_ok[:1467] = True                       # pinned: 97.8 % right
    tonight_ok = base_ok.copy()
    tonight_ok[:30] = False                     # tonight: 30 of the same samples lost, 2.0 pp

    def with_outcomes(ok: np.ndarray) -> dict[str, Any]:
        doc = _tonight()
        for r in doc["devices"][0]["runs"]:
            r["outcomes"] = pack_outcomes(ok if r["precision"] == "int8" else base_ok)
            r["accuracy_drop_interval"] = {"drop_pp": 0.0, "low_pp": 0.0, "high_pp": 0.0, "n": 1500}
        return doc

    pin_results(with_outcomes(base_ok), tmp_path / "baselines" / "mnist-cnn" / "local.json")
    monkeypatch.setattr(pipeline.deploy, "deploy", lambda *a, **k: with_outcomes(tonight_ok))
    summary = run_nightly([ROOT / "examples" / "mnist.yaml"], ["local"], tmp_path / "out", tmp_path / "history",
                          0.5, log=lambda _: None, baselines=tmp_path / "baselines")
    # no history yet, so the last-good rule has nothing to say; the baseline rule catches int8
    (pair,) = summary["pairs"]
    assert pair["passed"] is False
    (why,) = pair["reasons"]
    assert why.startswith("local/onnxruntime-int8: accuracy 2.00 pp below the baseline (95 % interval")
    # without a pinned baseline the same night passes
    clean = run_nightly([ROOT / "examples" / "mnist.yaml"], ["local"], tmp_path / "out2", tmp_path / "history2",
                        0.5, log=lambda _: None, baselines=tmp_path / "none")
    assert clean["passed"] is True
