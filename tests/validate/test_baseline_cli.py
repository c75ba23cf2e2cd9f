"""`edgeship baseline pin` and `edgeship history` through the real CLI (results and history written
in code; the deploy that would write them runs in tests/test_deploy_local.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.validate.baseline import pack_outcomes, unpack_outcomes
from tests.validate.helpers import results, row

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "examples" / "mnist.yaml")


def test_baseline_pin_keeps_outcomes(tmp_path: Path) -> None:
    doc = results([("local", [row("onnxruntime", "int8", 97.5)])])
    ok = np.arange(1500) % 40 != 0                           # 1,462 of 1,500 right
    run = doc["devices"][0]["runs"][0]
    run["outcomes"], run["accuracy_drop_interval"] = pack_outcomes(ok), {"n": 1500}
    out = tmp_path / "build"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(doc))
    assert main(["baseline", "pin", "--spec", SPEC, "--target", "local", "--out", str(out),
                 "--baselines", str(tmp_path / "baselines")]) == 0
    pinned = json.loads((tmp_path / "baselines" / "mnist-cnn" / "local.json").read_text())
    base = pinned["runs"]["local/onnxruntime-int8"]
    assert base["n"] == 1500 and unpack_outcomes(base["outcomes"], 1500).sum() == 1462
    assert base["accuracy"] == 97.5 and pinned["release_id"] == "ab" * 32


def test_baseline_pin_without_results_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["baseline", "pin", "--spec", SPEC, "--target", "local", "--out", str(tmp_path / "none"),
                 "--baselines", str(tmp_path / "baselines")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none/results.json: no results to pin; run `edgeship deploy`" in err[0]
    assert not (tmp_path / "baselines").exists()


def test_history_prints_the_trend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hist = tmp_path / "history" / "mnist-cnn" / "local.jsonl"
    hist.parent.mkdir(parents=True)
    nights = [{"when": f"2026-12-0{d}T02:00:00Z", "devices": [{"device": "local", "runs": [
        {"id": "ncnn-int8", "accuracy": 97.9 - 0.4 * i, "latency_ms": {"p50": 0.112}, "gate": {"passed": i < 2}}]}]}
        for i, d in enumerate((1, 2, 3))]
    hist.write_text("".join(json.dumps(n) + "\n" for n in nights))
    assert main(["history", "--spec", SPEC, "--target", "local", "--history", str(tmp_path / "history")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "local/ncnn-int8" in ln]
    assert len(lines) == 3
    assert "2026-12-01" in lines[0] and "97.90" in lines[0] and "0.112" in lines[0] and "pass" in lines[0]
    assert "2026-12-03" in lines[2] and "97.10" in lines[2] and "FAIL" in lines[2]


def _history(tmp_path: Path, *metrics: str | None) -> str:
    """A history with one night per metric (None: an entry from before entries recorded it)."""
    hist = tmp_path / "history" / "mnist-cnn" / "local.jsonl"
    hist.parent.mkdir(parents=True, exist_ok=True)
    nights = [{"when": f"2026-12-0{i + 1}T02:00:00Z", **({"metric": m} if m else {}), "devices": [{
        "device": "local", "runs": [{"id": "tflite-int8", "accuracy": 71.25, "gate": {"passed": True}}]}]}
        for i, m in enumerate(metrics)]
    hist.write_text("".join(json.dumps(n) + "\n" for n in nights))
    return str(tmp_path / "history")


def _header(capsys: pytest.CaptureFixture[str]) -> list[str]:
    out = capsys.readouterr().out.splitlines()
    return next(ln.split() for ln in out if ln.split()[:2] == ["night", "run"])


@pytest.mark.parametrize("metrics, column, cell", [
    (("map", "map"), ["mAP"], "71.25"),
    ((None, "mine"), ["mine"], "71.25"),            # a user metric's own name; an old entry does not count
    ((None, None), ["accuracy", "%"], "71.25"),     # entries from before the metric was recorded
    (("top1", "map"), ["metric"], "71.25 mAP"),     # the metric changed: each value names its own
], ids=["map", "user-metric", "old-entries", "mixed"])
def test_history_names_its_column_by_the_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                metrics: tuple[str | None, ...], column: list[str], cell: str) -> None:
    history = _history(tmp_path, *metrics)
    assert main(["history", "--spec", SPEC, "--target", "local", "--history", history]) == 0
    header = _header(capsys)
    assert header[2:2 + len(column)] == column and header[2 + len(column):] == ["p50", "ms", "verdict"], header
    main(["history", "--spec", SPEC, "--target", "local", "--history", history])
    last = [ln for ln in capsys.readouterr().out.splitlines() if "local/tflite-int8" in ln][-1]
    assert f" {cell} " in f" {last} " and "2026-12-02" in last, last


def test_history_accept_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An intended change (the artifact grew by design) is accepted once; the history keeps the
    reason, the table shows it, and the next night compares with the accepted run."""
    from pipeline.nightly import last_good

    history = _history(tmp_path, "top1")
    hist = Path(history) / "mnist-cnn" / "local.jsonl"
    grown = {"when": "2026-12-02T02:00:00Z", "metric": "top1", "devices": [{"device": "local", "runs": [
        {"id": "tflite-int8", "accuracy": 71.0, "artifact_bytes": 5_300_000, "gate": {"passed": True},
         "regressions": ["local/tflite-int8: artifact 5.3e+06 bytes is 10.5 % over the last good run's"]}]}]}
    with open(hist, "a") as fh:
        fh.write(json.dumps(grown) + "\n")
    base = ["history", "--spec", SPEC, "--target", "local", "--history", history]
    assert main([*base, "--run", "tflite-int8"]) == 2              # --run without --accept
    assert main([*base, "--accept"]) == 2                          # no reason
    assert "--reason is empty" in capsys.readouterr().err
    assert main([*base, "--accept", "--run", "tflite-int8", "--reason", "depthwise layers float by design"]) == 0
    out = capsys.readouterr().out
    assert "accepted local/tflite-int8 of 2026-12-02T02:00:00Z as last good: depthwise layers float by design" in out
    assert any("2026-12-02" in ln and "accepted" in ln and "depthwise layers float" in ln for ln in out.splitlines())
    assert last_good(hist)["local/tflite-int8"]["artifact_bytes"] == 5_300_000
