"""calibration.search on its own, with a numpy builder: a two-layer model whose hidden channel 0
is planted x300 (read back by 1/300), so a per-tensor int8 range on fc2's input only resolves
that channel. The search logic (method choice, fallback, budget, report, the metric as a value)
is what is under test; the backends' tests run it with real runtimes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibration.search import (Agreement, Holdout, Ranking, SearchOptions, score, search, summary)
from calibration.sensitivity import LayerSensitivity

RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 1, (16, 12)).astype(np.float32)
W2 = RNG.normal(0, 1, (12, 10)).astype(np.float32)
W1[:, 0] *= 300.0
W2[0, :] /= 300.0
X = np.abs(RNG.normal(0, 1, (200, 16))).astype(np.float32)
LEVELS = {"minmax": 127, "coarse": 15}  # int8 levels per side: "coarse" is worse


def fq(x: np.ndarray, levels: int) -> np.ndarray:
    s = float(np.abs(x).max()) / levels
    return np.clip(np.round(x / s), -levels, levels) * s


def forward(x: np.ndarray, levels: int | None, float_layers: Sequence[str]) -> np.ndarray:
    q = (lambda a, name: a if levels is None or name in float_layers else fq(a, levels))
    h = np.maximum(q(x, "fc1") @ W1, 0.0)
    return q(h, "fc2") @ W2


@dataclass
class ToyCandidate:
    method: str
    float_layers: tuple[str, ...]

    def run(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": forward(x["x"], LEVELS[self.method], self.float_layers)}

    def write(self, workdir: Path) -> list[str]:
        return []

    def notes(self) -> dict[str, Any]:
        return {"float": list(self.float_layers)}


class ToyBuilder:
    def __init__(self) -> None:
        self.built: list[tuple[str, tuple[str, ...]]] = []

    def candidate(self, method: str, float_layers: Sequence[str]) -> ToyCandidate:
        self.built.append((method, tuple(float_layers)))
        return ToyCandidate(method, tuple(float_layers))

    def rank(self, method: str, holdout: Holdout, reference: dict[str, np.ndarray]) -> Ranking:
        from calibration.metrics import sqnr_db

        base = sqnr_db(reference["logits"], ToyCandidate(method, ()).run(holdout.x)["logits"])
        saved = {n: sqnr_db(reference["logits"], ToyCandidate(method, (n,)).run(holdout.x)["logits"]) - base
                 for n in ("fc1", "fc2")}
        return Ranking([LayerSensitivity(n, "MatMul", float("nan"), saved[n], 0.0)
                        for n in sorted(saved, key=lambda n: -saved[n])], solo_sqnr=lambda n: 1.0)


def holdout() -> tuple[Holdout, dict[str, np.ndarray]]:
    return Holdout({"x": X}), {"logits": forward(X, None, ())}


def test_method_choice_fallback_and_one_report() -> None:
    hold, ref = holdout()
    builder = ToyBuilder()
    res = search(builder, hold, ref, SearchOptions(("minmax", "coarse"), budget_pp=2.0), Agreement())
    rep = res.report
    assert rep.method == "minmax" and set(rep.method_scores) == {"minmax", "coarse"}
    assert rep.method_scores["minmax"]["sqnr_db"] > rep.method_scores["coarse"]["sqnr_db"]
    assert rep.method_scores["minmax"]["drop_pp"] > 2.0  # the planted channel ruins it
    assert [f.name for f in rep.fallback_layers] == ["fc2"] and rep.fallback_layers[0].sqnr_db == 1.0
    assert rep.budget_met is True and rep.holdout["drop_pp"] <= 2.0 and rep.fallback_tried == [(1, rep.holdout["drop_pp"])]
    assert res.candidate.float_layers == ("fc2",) and res.candidate.method == "minmax"
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # strict JSON: no NaN left
    assert set(summary(d)) == {"method", "reason", "budget_met", "budget_reason", "fallback_layers",
                               "calibration_time_s", "stats_cache_hit"}
    assert d["fallback_layers"][0]["name"] == "fc2" and d["metric"] == "top1_agreement"


def test_fallback_off_or_no_budget() -> None:
    hold, ref = holdout()
    rep = search(ToyBuilder(), hold, ref, SearchOptions(("minmax",), budget_pp=2.0, fallback=False), Agreement()).report
    assert rep.budget_met is False and "fallback is off" in rep.budget_reason and rep.fallback_layers == []
    assert rep.reason == "minmax: requested explicitly"
    builder = ToyBuilder()
    rep = search(builder, hold, ref, SearchOptions(("minmax",)), Agreement()).report
    assert rep.budget_met is None and builder.built == [("minmax", ())]


@dataclass(frozen=True)
class MeanAbsError:
    """A lower-is-better user metric: its drop is the increase."""

    name: str = "mae"
    higher_is_better: bool = False

    def score(self, outputs: dict[str, np.ndarray], target: Any) -> float:
        return float(np.abs(outputs["logits"] - target["logits"]).mean())


def test_the_metric_is_a_value_and_lower_is_better_counts_the_increase() -> None:
    hold, ref = holdout()
    out = ToyCandidate("minmax", ()).run(hold.x)
    fig = score(out, ref, hold, MeanAbsError())
    assert fig["fp32_mae"] == 0.0 and fig["mae"] > 0 and fig["drop_pp"] == fig["mae"]
    # a budget in the metric's units: the planted layer's error is over it, fc2 float is under
    budget = fig["mae"] / 4
    rep = search(ToyBuilder(), hold, ref, SearchOptions(("minmax",), budget_pp=budget), MeanAbsError()).report
    assert rep.metric == "mae" and rep.budget_met is True and [f.name for f in rep.fallback_layers] == ["fc2"]
    assert rep.holdout["mae"] <= budget


def test_labels_are_scored_when_the_holdout_has_them() -> None:
    from calibration.search import Top1

    hold, ref = holdout()
    labels = ref["logits"].argmax(1)
    labels[:20] = (labels[:20] + 1) % 10  # fp32 itself is 90 % right
    fig = score(ref, ref, Holdout(hold.x, labels), Top1())
    assert fig["accuracy"] == fig["fp32_accuracy"] == 90.0 and fig["drop_pp"] == 0.0


NOISE = {"coarse": 0.3, "minmax": 0.01, "near": 0.011}  # output noise per method: SQNR ~ -20 log10(sigma)


@dataclass
class NoisyCandidate:
    """fp32's outputs plus per-sample deterministic noise (the same for a sample in any subset)."""

    method: str
    float_layers: tuple[str, ...]
    runs: dict[str, int]

    def run(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs[self.method] = self.runs.get(self.method, 0) + len(x["x"])
        ref = forward(x["x"], None, ())
        wave = np.sin(1000.0 * x["x"].sum(axis=1, keepdims=True) + np.arange(ref.shape[1]))
        return {"logits": ref + NOISE[self.method] * np.abs(ref).mean() * wave}


class CountingBuilder(ToyBuilder):
    """Builds NoisyCandidates and counts the samples each method runs."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, int] = {}

    def candidate(self, method: str, float_layers: Sequence[str]) -> NoisyCandidate:  # type: ignore[override]
        self.built.append((method, tuple(float_layers)))
        return NoisyCandidate(method, tuple(float_layers), self.samples)


def test_the_method_race_stops_a_method_far_behind_and_keeps_close_ones() -> None:
    from calibration.search import RACE_MARGIN_DB

    hold, ref = holdout()  # 200 samples: raced
    builder = CountingBuilder()
    rep = search(builder, hold, ref, SearchOptions(("coarse", "minmax", "near")), Agreement()).report
    # coarse (~30 dB behind) stops after the strided third; minmax and near (under 1 dB apart,
    # within the margin) both run the whole holdout
    assert builder.samples == {"coarse": 67, "minmax": 200, "near": 200}
    assert rep.method_scores["coarse"]["n"] == 67 and rep.method_scores["minmax"]["n"] == 200
    assert rep.method == "minmax" and rep.holdout == rep.method_scores["minmax"]
    assert f"stopped over {RACE_MARGIN_DB:g} dB behind" in rep.reason and "coarse" in rep.reason
    # the contenders' whole-holdout figures are exactly those of an unraced run (order restored)
    whole = score(NoisyCandidate("near", (), {}).run(hold.x), ref, hold, Agreement())
    assert rep.method_scores["near"] == whole
    # a small holdout is not raced: every method runs all of it
    small = CountingBuilder()
    search(small, hold.take(np.arange(40)), {"logits": ref["logits"][:40]}, SearchOptions(("coarse", "minmax")),
           Agreement())
    assert small.samples == {"coarse": 40, "minmax": 40}


def test_sqnr_floor_drives_the_fallback_without_a_budget() -> None:
    hold, ref = holdout()
    base = search(ToyBuilder(), hold, ref, SearchOptions(("minmax",)), Agreement()).report.holdout["sqnr_db"]
    rep = search(ToyBuilder(), hold, ref, SearchOptions(("minmax",), min_sqnr_db=base + 1.0), Agreement()).report
    assert [f.name for f in rep.fallback_layers] == ["fc2"] and rep.budget_met is True
    assert rep.holdout["sqnr_db"] >= base + 1.0
    rep = search(ToyBuilder(), hold, ref, SearchOptions(("minmax",), min_sqnr_db=base + 1.0, fallback=False),
                 Agreement()).report
    assert rep.budget_met is False and rep.fallback_layers == []
    assert rep.budget_reason == f"holdout SQNR {base:.2f} dB < floor {base + 1.0:.2f} dB and fallback is off"


class ClosingBuilder(ToyBuilder):
    """A builder whose runtime would rather run ``extra`` in float too (``Ranking.close``); a
    candidate naming "bad-layer" is built with nothing in float (as if more float had made it
    worse), so closing it misses the budget."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.extra = extra

    def candidate(self, method: str, float_layers: Sequence[str]) -> ToyCandidate:
        found = super().candidate(method, float_layers)
        return ToyCandidate(method, ()) if "bad-layer" in float_layers else found

    def rank(self, method: str, holdout: Holdout, reference: dict[str, np.ndarray]) -> Ranking:
        ranking = super().rank(method, holdout, reference)
        ranking.close = lambda names: names + [self.extra]
        return ranking


def test_closing_islands_adds_layers_only_when_the_real_candidate_still_meets_the_budget() -> None:
    hold, ref = holdout()
    res = search(ClosingBuilder("fc1"), hold, ref, SearchOptions(("minmax",), budget_pp=2.0), Agreement())
    rep = res.report
    assert rep.islands_closed == ["fc1"] and [f.name for f in rep.fallback_layers] == ["fc2", "fc1"]
    assert res.candidate.float_layers == ("fc2", "fc1") and rep.budget_met is True
    assert rep.holdout["drop_pp"] == 0.0  # both layers float: fp32 itself
    res = search(ClosingBuilder("bad-layer"), hold, ref, SearchOptions(("minmax",), budget_pp=2.0), Agreement())
    assert res.report.islands_closed == [] and res.candidate.float_layers == ("fc2",)
    assert [f.name for f in res.report.fallback_layers] == ["fc2"] and res.report.budget_met is True
