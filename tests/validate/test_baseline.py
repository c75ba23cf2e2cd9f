"""The baseline rule: a 0.4 pp/night drift on n = 1,500 is caught against the pinned baseline while
the last-good rule (each night within 0.5 pp of the night before) lets every night pass; noise
alone is never caught; latency, RSS and size against the baseline. The nights are simulated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.nightly import regressions_by_run
from pipeline.validate.baseline import (baseline_run, compare_run, pack_outcomes, read_baseline, unpack_outcomes,
                                        write_baseline)
from pipeline.validate.stats import discordant, paired_drop_interval

N = 1500
KEY = "local/onnxruntime-int8"


def test_pack_outcomes_hand_computed() -> None:
    # bits 1 0 1 1 0 0 0 0 | 1 (padded 0000000) -> bytes 0xb0 0x80 -> base64 "sIA="
    bits = [True, False, True, True, False, False, False, False, True]
    assert pack_outcomes(bits) == "sIA="
    assert unpack_outcomes("sIA=", 9).tolist() == bits


def _nights(drift_per_night: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Baseline 1,467 of 1,500 right (97.8 %); night k loses k * drift samples for good, plus noise:
    4 other samples flip right -> wrong and 4 of the baseline's wrong ones -> right, at random each
    night (net 0), so b = k * drift + 4 and c = 4 against the baseline."""
    rng = np.random.default_rng(seed)
    base = np.zeros(N, dtype=bool)
    base[:1467] = True
    nights = []
    for k in range(1, 6):
        night = base.copy()
        night[:k * drift_per_night] = False                      # the drift: the first samples, cumulatively
        right, wrong = np.flatnonzero(night), np.flatnonzero(~base)
        night[rng.choice(right[k * drift_per_night:], 4, replace=False)] = False
        night[rng.choice(wrong, 4, replace=False)] = True
        nights.append(night)
    return base, nights


def _row(outcomes: np.ndarray, night: int) -> dict:
    return {"id": "onnxruntime-int8", "accuracy": round(100.0 * outcomes.mean(), 4), "gate": {"passed": True},
            "latency_ms": {"p50": 0.5}, "peak_rss_mb": 60.0, "artifact_bytes": 32_000, "when": f"night {night}"}


def test_drift_of_0_4_pp_a_night_caught_by_the_baseline_not_by_last_good() -> None:
    base, nights = _nights(drift_per_night=6)  # 6 of 1,500 = 0.4 pp a night
    pinned = baseline_run(_row(base, 0), base)
    good = {KEY: _row(base, 0)}
    caught = []
    for k, night in enumerate(nights, start=1):
        row = _row(night, k)
        # last-good rule: tonight vs the newest night that passed; 0.4 pp < 0.5 pp, so every night passes
        assert regressions_by_run({"devices": [{"device": "local", "runs": [row]}]}, good, 0.5) == {}
        good[KEY] = row
        if compare_run(KEY, pinned, row, night, None, tolerance_pp=0.5):
            caught.append(k)
    # night 1: b = 10, c = 4, drop 0.4 pp, inside the tolerance. Night 2: b = 16, c = 4, drop 0.8 pp;
    # conditional on m = 20: p_lo = CP lower(16 of 20) = 0.5634 (beta quantile), so the lower end is
    # 100 * 20 * (2 * 0.5634 - 1) / 1500 = 0.169 pp > 0: caught, and every night after it.
    assert caught == [2, 3, 4, 5]
    assert paired_drop_interval(*discordant(base, nights[1]))["low_pp"] == pytest.approx(0.169, abs=1e-3)
    reasons = compare_run(KEY, pinned, _row(nights[4], 5), nights[4], None, tolerance_pp=0.5)
    assert reasons[0].startswith(f"{KEY}: accuracy 2.00 pp below the baseline")


def test_noise_alone_is_never_caught() -> None:
    base, nights = _nights(drift_per_night=0, seed=3)
    pinned = baseline_run(_row(base, 0), base)
    # every night: b = 4, c = 4, drop 0: neither over the tolerance nor significant
    assert all(compare_run(KEY, pinned, _row(n, k), n, None, tolerance_pp=0.5) == [] for k, n in enumerate(nights))


def test_a_different_evaluation_set_is_not_paired() -> None:
    base, nights = _nights(drift_per_night=60)
    pinned = baseline_run(_row(base, 0), base)
    assert compare_run(KEY, pinned, _row(nights[0][:1000], 1), nights[0][:1000], None, tolerance_pp=0.5) == []


def test_latency_rss_and_size_against_the_baseline(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    base_t = 0.5 * rng.lognormal(0.0, 0.05, 200)
    base, _ = _nights(0)
    path = write_baseline(tmp_path / "baselines" / "mnist-cnn" / "local.json", "mnist-cnn", "local", "ab" * 32,
                          {KEY: baseline_run(_row(base, 0), base, base_t)})
    pinned = read_baseline(path)["runs"][KEY]
    assert pinned["n"] == N and len(pinned["timings_ms"]) == 200
    same = compare_run(KEY, pinned, _row(base, 1), base, 0.5 * rng.lognormal(0.0, 0.05, 200), tolerance_pp=0.5)
    assert same == []
    slower = {**_row(base, 1), "peak_rss_mb": 70.0, "artifact_bytes": 32_500}  # RSS +16.7 %, size +1.6 %
    found = compare_run(KEY, pinned, slower, base, 1.3 * 0.5 * rng.lognormal(0.0, 0.05, 200), tolerance_pp=0.5)
    assert len(found) == 2
    assert "slower than the baseline's" in found[0] and "limit 10 %" in found[0]
    assert found[1] == f"{KEY}: peak RSS 70 MB is 16.7 % over the baseline's 60 MB (limit 10 %)"
    assert read_baseline(tmp_path / "missing.json") is None
    assert pytest.approx(100 * unpack_outcomes(pinned["outcomes"], N).mean()) == 97.8
