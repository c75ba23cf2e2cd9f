"""Known-answer tests of pipeline.validate.stats: every expected number is computed by hand in the
comments (closed forms of the binomial tails, enumerated bootstrap distributions, U counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.validate import stats


# ---- exact paired interval --------------------------------------------------------------------

def test_clopper_pearson_closed_forms() -> None:
    # k = m: upper end 1, lower end solves P(X >= m) = p^m = 0.025  ->  p = 0.025^(1/m)
    # m = 3: 0.025^(1/3) = 0.29240177
    assert stats.clopper_pearson(3, 3) == pytest.approx((0.025 ** (1 / 3), 1.0), abs=1e-9)
    # k = 0 of 10: lower end 0, upper end solves (1 - p)^10 = 0.025  ->  1 - 0.025^(1/10) = 0.30849711
    assert stats.clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1), abs=1e-9)
    # k = 1 of 2: P(X >= 1) = 1 - (1 - p)^2 = 0.025  ->  p = 1 - sqrt(0.975) = 0.01257912; symmetric
    lo, hi = stats.clopper_pearson(1, 2)
    assert lo == pytest.approx(1 - math.sqrt(0.975), abs=1e-9)
    assert hi == pytest.approx(math.sqrt(0.975), abs=1e-9)


def test_paired_drop_interval_hand_computed() -> None:
    # b = 3, c = 0, n = 100: drop (3 - 0) / 100 = 3 pp; m = 3, p in [0.29240, 1]
    # low = 100 * 3 * (2 * 0.29240177 - 1) / 100 = -1.24559 pp, high = 100 * 3 * (2 - 1) / 100 = 3 pp
    iv = stats.paired_drop_interval(3, 0, 100)
    assert iv["drop_pp"] == pytest.approx(3.0)
    assert iv["low_pp"] == pytest.approx(3 * (2 * 0.025 ** (1 / 3) - 1), abs=1e-3)
    assert iv["low_pp"] == pytest.approx(-1.2456, abs=1e-4)
    assert iv["high_pp"] == pytest.approx(3.0)
    assert iv["n"] == 100
    # b = c = 1, n = 50: drop 0; m = 2, p in [1 - sqrt(.975), sqrt(.975)] = [0.012579, 0.987421]
    # low = 100 * 2 * (2 * 0.012579 - 1) / 50 = -3.89937 pp, high = +3.89937 pp
    iv = stats.paired_drop_interval(1, 1, 50)
    assert iv["drop_pp"] == 0.0
    assert iv["low_pp"] == pytest.approx(-3.8994, abs=1e-4)
    assert iv["high_pp"] == pytest.approx(3.8994, abs=1e-4)
    # no discordant pair: conditionally nothing differs
    iv = stats.paired_drop_interval(0, 0, 384)
    assert (iv["drop_pp"], iv["low_pp"], iv["high_pp"]) == (0.0, 0.0, 0.0)


def test_discordant_counts_from_outcomes() -> None:
    ref = [True, True, True, False, False, True]
    cand = [True, False, False, True, False, True]
    # b: ref right, cand wrong -> samples 1, 2; c: the reverse -> sample 3
    assert stats.discordant(ref, cand) == (2, 1, 6)
    with pytest.raises(ValueError, match="differ in length"):
        stats.discordant([True], [True, False])


def test_disagreement_interval_is_a_plain_proportion() -> None:
    # fidelity: 2 disagreements of 10: drop 20 pp; Clopper-Pearson of 0 of 10 bounds the zero case:
    # 0 of 10 -> [0, 30.8497] pp (upper end 1 - 0.025^(1/10)), not the degenerate [0, 0]
    iv = stats.disagreement_interval(0, 10)
    assert (iv["drop_pp"], iv["low_pp"]) == (0.0, 0.0)
    assert iv["high_pp"] == pytest.approx(100 * (1 - 0.025 ** 0.1), abs=1e-3)
    # 10 of 10 -> [100 * 0.025^(1/10), 100] = [69.1503, 100]
    iv = stats.disagreement_interval(10, 10)
    assert iv["low_pp"] == pytest.approx(100 * 0.025 ** 0.1, abs=1e-3)
    assert iv["high_pp"] == 100.0


# ---- paired bootstrap --------------------------------------------------------------------------

def test_bootstrap_two_samples_enumerated() -> None:
    # per-sample drops d = [0, 100]: a resample of two takes mean 0 (p 1/4), 50 (1/2) or 100 (1/4),
    # so the 2.5th percentile of 2,000 resamples is 0 and the 97.5th is 100; the point is 50
    iv = stats.bootstrap_drop([100.0, 100.0], [100.0, 0.0], seed=7)
    assert (iv["drop_pp"], iv["low_pp"], iv["high_pp"]) == (50.0, 0.0, 100.0)
    assert (iv["resamples"], iv["seed"], iv["n"]) == (2000, 7, 2)


def test_bootstrap_fixed_seed_reproducible_and_fn_form_agrees() -> None:
    rng = np.random.default_rng(123)
    ref = (rng.random(300) < 0.9) * 100.0
    cand = np.where(rng.random(300) < 0.05, 100.0 - ref, ref)
    first = stats.bootstrap_drop(ref, cand, seed=11)
    assert stats.bootstrap_drop(ref, cand, seed=11) == first
    assert stats.bootstrap_drop(ref, cand, seed=12) != first
    # the metric-function form draws the same indices for the same seed: the same interval
    by_fn = stats.bootstrap_drop_fn(300, lambda i: float(ref[i].mean()), lambda i: float(cand[i].mean()), seed=11)
    for key in ("drop_pp", "low_pp", "high_pp"):
        assert by_fn[key] == pytest.approx(first[key], abs=1e-9)


def test_bootstrap_matches_the_normal_interval_on_a_large_sample() -> None:
    # 30 of 1,000 samples lost (drop 100 each): mean 3 pp, sd of the mean
    # sqrt(0.03 * 0.97 / 1000) * 100 = 0.5394 pp -> normal 95 % interval 3 +- 1.057 = [1.943, 4.057]
    ref = np.full(1000, 100.0)
    cand = ref.copy()
    cand[:30] = 0.0
    iv = stats.bootstrap_drop(ref, cand, seed=0)
    assert iv["drop_pp"] == pytest.approx(3.0)
    assert iv["low_pp"] == pytest.approx(1.943, abs=0.25)
    assert iv["high_pp"] == pytest.approx(4.057, abs=0.25)


# ---- latency -----------------------------------------------------------------------------------

def test_cv_and_p50_interval_hand_computed() -> None:
    # [1, 2, 3, 4, 5]: mean 3, sample variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5, CV sqrt(2.5) / 3 = 0.52705
    assert stats.coefficient_of_variation([1, 2, 3, 4, 5]) == pytest.approx(math.sqrt(2.5) / 3)
    assert stats.coefficient_of_variation([4.0]) is None
    # [1, 2]: a resample's median is 1 (p 1/4), 1.5 (1/2) or 2 (1/4) -> interval [1, 2], p50 1.5
    assert stats.p50_interval([1.0, 2.0]) == (1.5, 1.0, 2.0)
    # constant timings: a degenerate interval at the value
    assert stats.p50_interval([0.7] * 50) == (0.7, 0.7, 0.7)


def test_timing_summary_flags_unstable() -> None:
    rng = np.random.default_rng(5)
    steady = rng.lognormal(0.0, 0.05, 200)
    summary = stats.timing_summary(steady, max_cv=0.15)
    assert summary["p50_low"] <= summary["p50"] <= summary["p50_high"]
    assert summary["p50_high"] - summary["p50_low"] < 0.05
    assert summary["unstable"] is False and summary["runs"] == 200
    # a busy machine: a third of the runs take 5x as long -> CV far over 0.15
    busy = np.concatenate([steady[:140], steady[140:] * 5])
    assert stats.timing_summary(busy, max_cv=0.15)["unstable"] is True


def test_mann_whitney_exact_hand_computed() -> None:
    # The counts of U over the C(6, 3) = 20 orderings of 3 + 3 values are 1 1 2 3 3 3 3 2 1 1 (U = 0..9)
    assert stats._u_distribution(3, 3) == [1, 1, 2, 3, 3, 3, 3, 2, 1, 1]
    # every current timing above every baseline timing: U = 9, p = 1/20 = 0.05
    res = stats.mann_whitney_greater([1, 2, 3], [4, 5, 6])
    assert (res["u"], res["method"]) == (9.0, "exact")
    assert res["p_value"] == pytest.approx(1 / 20)
    # baseline [1, 2, 4], current [3, 5, 6]: pairs with current larger 2 + 3 + 3 = 8 -> p = (1 + 1) / 20
    assert stats.mann_whitney_greater([1, 2, 4], [3, 5, 6])["p_value"] == pytest.approx(0.1)


def test_mann_whitney_normal_with_ties_hand_computed() -> None:
    # 30 baseline timings of 1.0 and 30 current of 2.0 (60 values, two tie groups of 30):
    # U = 900, mean 450, var = 900/12 * (61 - 2 * (30^3 - 30) / (60 * 59)) = 75 * 15.7458 = 1180.93
    # z = (900 - 450 - 0.5) / sqrt(1180.93) = 13.080 -> p = 0.5 erfc(13.08 / sqrt 2) ~ 2e-39
    res = stats.mann_whitney_greater([1.0] * 30, [2.0] * 30)
    assert res["method"] == "normal" and res["u"] == 900.0
    assert res["p_value"] == pytest.approx(0.5 * math.erfc(449.5 / math.sqrt(75 * (61 - 2 * 26970 / 3540)) / math.sqrt(2)))
    assert stats.mann_whitney_greater([1.0] * 30, [1.0] * 30)["p_value"] == 1.0


def _timings(seed: int, n: int = 200, p50_ms: float = 2.0) -> np.ndarray:
    """Raw timings of a shared machine: lognormal jitter (CV ~ 5 %) plus a few 3x outliers."""
    rng = np.random.default_rng(seed)
    t = p50_ms * rng.lognormal(0.0, 0.05, n)
    t[rng.random(n) < 0.03] *= 3.0
    return t


def test_injected_30pct_slowdown_is_caught() -> None:
    res = stats.latency_regression(_timings(1), _timings(2) * 1.30)
    assert res["significant"] and res["regressed"]
    assert res["slower_pct"] == pytest.approx(30.0, abs=3.0)


def test_2pct_jitter_is_not_caught() -> None:
    res = stats.latency_regression(_timings(1), _timings(3) * 1.02)
    # 200 timings a side resolve even 2 % (significant): the 10 % limit is what keeps it a pass
    assert res["significant"] and not res["regressed"]
    assert res["slower_pct"] < 10.0
    # the same machine twice, no slowdown: not even significant
    same = stats.latency_regression(_timings(1), _timings(4))
    assert not same["significant"] and not same["regressed"]


def test_large_slowdown_on_too_few_timings_is_not_significant() -> None:
    # 3 + 3 timings: the smallest exact p is 1/20 = 0.05 > alpha 0.01, whatever the ratio
    res = stats.latency_regression([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    assert res["slower_pct"] > 10.0 and not res["significant"] and not res["regressed"]


# ---- interval vs budget ------------------------------------------------------------------------

def test_budget_verdict_and_samples_needed() -> None:
    # point 0.5, interval [-0.5, 1.5] on n = 400, budget 1.0: straddles; the upper half-width 1.0
    # must shrink to the gap 0.5: n * (1.0 / 0.5)^2 = 1,600 samples
    iv = {"drop_pp": 0.5, "low_pp": -0.5, "high_pp": 1.5, "n": 400}
    out = stats.budget_verdict(iv, 1.0)
    assert out["verdict"] == "inconclusive" and out["samples_needed"] == 1600
    assert "need about 1600 samples" in str(out["message"])
    # point 1.5 over the budget 1.0, lower half-width 1.5 - 0.8 = 0.7 vs gap 0.5: 400 * 1.96 = 784
    assert stats.budget_verdict({"drop_pp": 1.5, "low_pp": 0.8, "high_pp": 2.0, "n": 400}, 1.0)["samples_needed"] == 784
    assert stats.budget_verdict({"drop_pp": 0.2, "low_pp": 0.0, "high_pp": 0.9, "n": 400}, 1.0)["verdict"] == "pass"
    assert stats.budget_verdict({"drop_pp": 2.0, "low_pp": 1.2, "high_pp": 2.9, "n": 400}, 1.0)["verdict"] == "fail"
    on_budget = stats.budget_verdict({"drop_pp": 1.0, "low_pp": 0.5, "high_pp": 1.5, "n": 400}, 1.0)
    assert on_budget["samples_needed"] is None and "won't settle" in str(on_budget["message"])
