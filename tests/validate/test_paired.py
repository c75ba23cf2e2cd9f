"""accuracy_drop_interval from per-sample predictions and the release's evaluation data, by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.validate.paired import attach_drop_intervals, candidate_agrees, drop_interval, paired_outcomes
from pipeline.validate.stats import clopper_pearson


def _data(tmp_path: Path, reference: np.ndarray, labels: np.ndarray | None = None) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "reference.npy", reference.astype(np.float32), allow_pickle=False)
    if labels is not None:
        np.save(data / "y.npy", labels.astype(np.int64), allow_pickle=False)
    return data


def test_top1_interval_from_predictions(tmp_path: Path) -> None:
    # 10 samples, 3 classes. fp32's top-1 is class (i % 3); labels agree except on sample 9.
    ref = np.eye(3)[np.arange(10) % 3] * 5.0
    labels = np.arange(10) % 3
    labels[9] = (labels[9] + 1) % 3                    # fp32 wrong on sample 9
    pred = np.arange(10) % 3
    pred[[0, 1, 2]] = (pred[[0, 1, 2]] + 1) % 3        # candidate wrong where fp32 was right: b = 3
    pred[9] = labels[9]                                # candidate right where fp32 was wrong: c = 1
    data = _data(tmp_path, ref, labels)
    outcomes = paired_outcomes(pred.tolist(), data, "top1")
    assert outcomes is not None
    assert outcomes[0].tolist() == [True] * 9 + [False]                      # fp32 wrong only on 9
    assert outcomes[1].tolist() == [False] * 3 + [True] * 7                  # candidate wrong on 0, 1, 2
    iv = drop_interval(pred.tolist(), data, "top1")
    assert iv is not None and (iv["b"], iv["c"], iv["n"]) == (3, 1, 10)
    # drop (3 - 1) / 10 = 20 pp; m = 4, p = Clopper-Pearson(3 of 4); drop range 100 * 4 (2p - 1) / 10
    lo, hi = clopper_pearson(3, 4)
    assert iv["drop_pp"] == pytest.approx(20.0)
    assert iv["low_pp"] == pytest.approx(40 * (2 * lo - 1), abs=1e-3)
    assert iv["high_pp"] == pytest.approx(40 * (2 * hi - 1), abs=1e-3)


def test_fidelity_interval_counts_ties_like_the_agent(tmp_path: Path) -> None:
    # fp32 probabilities: sample 0 is a near tie between classes 0 and 1 (0.50 vs 0.49), sample 1 is not
    ref = np.array([[0.50, 0.49, 0.01], [0.90, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    pred = np.array([1, 1, 1, 2])                      # swaps on samples 0 (a tie) and 1 (not)
    assert candidate_agrees(ref, pred, 0.02).tolist() == [True, False, True, True]
    data = _data(tmp_path, ref)
    strict = drop_interval(pred.tolist(), data, "fidelity")
    ties = drop_interval(pred.tolist(), data, "fidelity", tie_margin=0.02)
    assert strict is not None and ties is not None
    assert (strict["b"], strict["drop_pp"]) == (2, 50.0)   # 2 of 4 disagree
    assert (ties["b"], ties["drop_pp"]) == (1, 25.0)       # 1 of 4 outside the ties
    # 1 of 4: Clopper-Pearson lower end solves 1 - (1 - p)^4 = 0.025 -> 1 - 0.975^(1/4) = 0.0063
    assert ties["low_pp"] == pytest.approx(100 * (1 - 0.975 ** 0.25), abs=1e-3)


def test_no_interval_without_pairable_outcomes(tmp_path: Path) -> None:
    data = _data(tmp_path, np.eye(3), labels=None)
    assert drop_interval([0, 1, 2], data, "top1") is None        # no labels here
    assert drop_interval([0, 1], data, "fidelity") is None        # a different number of samples
    rows = [{"id": "a", "error": None}, {"id": "b", "error": None}, {"id": "c", "error": "exit 1"}]
    raw = {"results": [{"id": "a", "predictions": [0, 1, 2]}, {"id": "b"}, {"id": "c", "predictions": [0]}]}
    attach_drop_intervals(rows, raw, data, "fidelity")
    assert rows[0]["accuracy_drop_interval"]["drop_pp"] == 0.0
    # the candidate's per-sample outcomes ride along, packed, for a baseline: all 3 agree -> 0b111 -> "4A=="
    assert rows[0]["outcomes"] == "4A=="
    assert "accuracy_drop_interval" not in rows[1] and "accuracy_drop_interval" not in rows[2]
