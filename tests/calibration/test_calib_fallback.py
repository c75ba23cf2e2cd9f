"""choose_fallback's search on its own: the ``evaluate`` callback here is a plain function of the
float layer set (the search logic is what is under test; the backends' tests run it with real
runtimes)."""

from __future__ import annotations

from calibration.sensitivity import LayerSensitivity, choose_fallback


def ranked(n: int) -> list[LayerSensitivity]:
    return [LayerSensitivity(f"l{i}", "Conv", float("nan"), float(n - i), 0.0) for i in range(n)]


def drop_when(needed: int):
    calls: list[int] = []

    def evaluate(names: list[str]) -> dict[str, float]:
        calls.append(len(names))
        return {"drop_pp": 1.0 if len(names) >= needed else 9.0}

    return evaluate, calls


def test_budget_met_without_fallback_tries_nothing() -> None:
    evaluate, calls = drop_when(3)
    res = choose_fallback(ranked(10), evaluate, {"drop_pp": 0.5}, 2.0)
    assert res.budget_met and res.layers == [] and calls == []


def test_fewest_layers_first() -> None:
    evaluate, calls = drop_when(3)
    res = choose_fallback(ranked(10), evaluate, {"drop_pp": 9.0}, 2.0)
    assert res.budget_met and [f.name for f in res.layers] == ["l0", "l1", "l2"] and calls == [1, 2, 3]


def test_bisects_the_gap_after_the_x1_5_steps() -> None:
    # 1..8 miss, 12 and 18 miss, 27 meets: bisecting 18..27 finds 20 instead of shipping 27
    evaluate, calls = drop_when(20)
    res = choose_fallback(ranked(60), evaluate, {"drop_pp": 9.0}, 2.0)
    assert res.budget_met and len(res.layers) == 20, res.tried
    assert calls[:11] == [1, 2, 3, 4, 5, 6, 7, 8, 12, 18, 27] and set(calls[11:]) <= set(range(19, 27))
    assert [k for k, _ in res.tried] == calls and len(calls) <= 11 + 4  # log2(9) bisection steps


def test_the_steps_end_at_the_limit_without_a_jump_of_more_than_half() -> None:
    """Doubling went from 32 float layers to all 52 of MobileNetV2's: a holdout that read one
    image of noise there ended the search. Every step past 8 is at most x1.5."""
    from calibration.sensitivity import _candidate_sizes

    sizes = _candidate_sizes(52)
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 12, 18, 27, 41, 52]
    assert all(b <= -(-3 * a // 2) for a, b in zip(sizes[7:], sizes[8:]))
    assert _candidate_sizes(5) == [1, 2, 3, 4, 5]


def test_budget_out_of_reach_says_so_with_all_but_one_layer_float() -> None:
    evaluate, calls = drop_when(100)
    res = choose_fallback(ranked(12), evaluate, {"drop_pp": 9.0}, 2.0)
    assert not res.budget_met and calls[-1] == 11 and "even with 11 of 12 layers in float" in res.reason


def sqnr_rises(per_layer: float):
    calls: list[int] = []

    def evaluate(names: list[str]) -> dict[str, float]:
        calls.append(len(names))
        return {"drop_pp": 0.0, "sqnr_db": 10.0 + per_layer * len(names)}

    return evaluate, calls


def test_sqnr_floor_keeps_layers_float_even_within_the_drop_budget() -> None:
    evaluate, calls = sqnr_rises(2.0)
    base = {"drop_pp": 0.0, "sqnr_db": 10.0}
    assert choose_fallback(ranked(10), evaluate, base, 1.0).layers == [] and calls == []  # no floor: done
    res = choose_fallback(ranked(10), evaluate, base, 1.0, min_sqnr_db=17.0)
    assert res.budget_met and len(res.layers) == 4 and calls == [1, 2, 3, 4] and res.metrics["sqnr_db"] == 18.0


def test_sqnr_floor_without_a_drop_budget_and_out_of_reach() -> None:
    evaluate, _ = sqnr_rises(0.1)
    res = choose_fallback(ranked(6), evaluate, {"drop_pp": 5.0, "sqnr_db": 10.0}, None, min_sqnr_db=30.0)
    assert not res.budget_met and len(res.layers) == 5
    assert res.reason == "holdout SQNR 10.50 dB < floor 30.00 dB even with 5 of 6 layers in float"
