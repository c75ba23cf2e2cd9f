"""Layer sensitivity and accuracy-aware fallback.

Sensitivity comes from the gated fake-quant model (:mod:`calibration.simulate`), two numbers per
layer on the holdout:

* ``sqnr_db``: output SQNR with only that layer quantized (how much damage it does alone);
* ``saved_db`` / ``saved_pp``: output SQNR and accuracy (or agreement) recovered when that
  layer alone is left in float while every other layer is quantized.

Layers are ranked by ``saved_db`` (continuous, so stable on a small holdout), then the fallback
keeps the top-ranked layers in float, fewest first, checking each candidate set with the *real*
QDQ model until the holdout drop is within budget and the output SQNR above the floor, if one
is set (1..8 layers, then steps of x1.5, then bisecting the last gap). On ONNX Runtime the
ranking is then reordered by noise removed per unit of time
(:func:`calibration.islands.order_by_cost`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.config import FallbackLayer
from calibration.metrics import fidelity, sqnr_db
from calibration.simulate import GatedModel


@dataclass
class LayerSensitivity:
    """Sensitivity of one layer (see module docstring)."""

    name: str
    op: str
    sqnr_db: float
    saved_db: float
    saved_pp: float

    def kept_float(self) -> FallbackLayer:
        """This layer as the report lists a layer the fallback kept in float."""
        return FallbackLayer(self.name, self.op, self.sqnr_db, self.saved_pp, self.saved_db)


def layer_sensitivity(
    gated: GatedModel,
    samples: np.ndarray,
    ref: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    tie_margin: float = 0.0,
) -> list[LayerSensitivity]:
    """Leave-one-out sensitivity of every gated layer, most sensitive (largest saved_db) first.

    ``sqnr_db`` (only this layer quantized) is left NaN here; :func:`only_layer_sqnr` fills it
    for the layers that matter, which halves the number of runs.
    """
    n = len(gated.layers)
    # several outputs: SQNR is the worst output's against the gates-off (fp32) model, so a layer
    # that only a later output reads (a detector's box head) ranks by the damage it does there
    ref_all = gated.run_all(samples, np.zeros(n, bool), batch_size) if len(gated.output_names) > 1 else None

    def measure(on: np.ndarray) -> dict[str, float]:
        got = gated.run_all(samples, on, batch_size)
        figures = fidelity(ref, got[gated.output_name], labels, tie_margin)
        if ref_all is not None:
            figures["sqnr_db"] = min(sqnr_db(r, got[k]) for k, r in ref_all.items())
        return figures

    base = measure(np.ones(n, bool))
    result = []
    for i, layer in enumerate(gated.layers):
        leave = np.ones(n, bool)
        leave[i] = False
        f_leave = measure(leave)
        result.append(
            LayerSensitivity(
                name=layer.node,
                op=layer.op,
                sqnr_db=float("nan"),
                saved_db=f_leave["sqnr_db"] - base["sqnr_db"],
                saved_pp=base["drop_pp"] - f_leave["drop_pp"],
            )
        )
    result.sort(key=lambda s: (-s.saved_db, -s.saved_pp))
    return result


def only_layer_sqnr(gated: GatedModel, samples: np.ndarray, ref: np.ndarray, name: str, batch_size: int = 32) -> float:
    """Output SQNR (dB) with only the named layer quantized."""
    on = np.array([layer.node == name for layer in gated.layers])
    return sqnr_db(ref, gated.run(samples, on, batch_size))


def _candidate_sizes(limit: int) -> list[int]:
    """1, 2, ..., 8, then steps of x1.5 up to ``limit``: fewest layers first, a bounded number of
    real evaluations. The steps are x1.5 rather than x2 because the bisection after them needs
    the size that first meets the budget to meet it for a reason: on MobileNetV2 (53 layers)
    doubling went from 32 layers, short of the floor, to 52, whose holdout drop read 2 pp (two
    images of 100: noise), and the search ended there without bisecting."""
    sizes = list(range(1, min(limit, 8) + 1))
    k = 12
    while k < limit:
        sizes.append(k)
        k = -(-3 * k // 2)  # ceil(1.5 k)
    if limit > 8 and limit not in sizes:
        sizes.append(limit)
    return sizes


@dataclass
class FallbackResult:
    """Outcome of :func:`choose_fallback`.

    Attributes:
        layers: layers kept in float, in the order taken (the ranking's).
        budget_met: whether the holdout drop is within budget.
        reason: why not, if not.
        metrics: holdout metrics of the final candidate.
        tried: (number of float layers, drop_pp) per real evaluation.
    """

    layers: list[FallbackLayer]
    budget_met: bool
    reason: str
    metrics: dict[str, float]
    tried: list[tuple[int, float]] = field(default_factory=list)


def meets(metrics: dict[str, float], max_drop_pp: float | None, min_sqnr_db: float | None = None) -> bool:
    """Whether holdout figures meet the budget (drop) and the fidelity floor (output SQNR)."""
    drop_ok = max_drop_pp is None or metrics["drop_pp"] <= max_drop_pp
    return drop_ok and (min_sqnr_db is None or metrics["sqnr_db"] >= min_sqnr_db)


def shortfall(metrics: dict[str, float], max_drop_pp: float | None, min_sqnr_db: float | None = None) -> str:
    """What of budget and floor ``metrics`` miss, as a phrase ('' when they meet both)."""
    parts = []
    if max_drop_pp is not None and metrics["drop_pp"] > max_drop_pp:
        parts.append(f"holdout drop {metrics['drop_pp']:.2f} pp > budget {max_drop_pp:.2f} pp")
    if min_sqnr_db is not None and metrics["sqnr_db"] < min_sqnr_db:
        parts.append(f"holdout SQNR {metrics['sqnr_db']:.2f} dB < floor {min_sqnr_db:.2f} dB")
    return " and ".join(parts)


def choose_fallback(
    ranked: list[LayerSensitivity],
    evaluate: Callable[[list[str]], dict[str, float]],
    base_metrics: dict[str, float],
    max_drop_pp: float | None,
    max_layers: int | None = None,
    min_sqnr_db: float | None = None,
) -> FallbackResult:
    """Keep the most sensitive layers in float until the holdout meets the budget and the floor.

    Args:
        ranked: layers, in the order to take them (most sensitive first, or a cost order).
        evaluate: builds the real QDQ model with the given nodes in float and returns its holdout
            metrics (must contain ``drop_pp`` and ``sqnr_db``).
        base_metrics: metrics with no layer in float.
        max_drop_pp: budget (None: none).
        max_layers: most layers to keep in float (default: all but one, else nothing is
            quantized).
        min_sqnr_db: fidelity floor, the holdout's output SQNR (None: none). A top-1 budget on a
            100-image holdout moves in 1 pp steps and swings by several; SQNR averages every output
            value, so a floor on it holds on unseen data (MobileNetV2: holdout and the 400
            evaluation images within 0.5 dB).

    Returns:
        The chosen layers, or ``budget_met=False`` with the reason.
    """
    def ok(m: dict[str, float]) -> bool:
        return meets(m, max_drop_pp, min_sqnr_db)

    if ok(base_metrics):
        return FallbackResult([], True, "", base_metrics)
    limit = len(ranked) - 1 if max_layers is None else min(max_layers, len(ranked) - 1)
    tried: list[tuple[int, float]] = []
    metrics = base_metrics
    k = below = 0

    def attempt(size: int) -> dict[str, float]:
        m = evaluate([s.name for s in ranked[:size]])
        tried.append((size, m["drop_pp"]))
        return m

    for k in _candidate_sizes(limit):
        metrics = attempt(k)
        if ok(metrics):
            break
        below = k
    if ok(metrics):
        # the sizes grow by x1.5 past 8: bisect the gap to the last size that missed, so a budget met
        # at 32 is not paid with 32 float layers when 20 would do
        while k - below > 1:
            mid = (k + below) // 2
            m = attempt(mid)
            if ok(m):
                k, metrics = mid, m
            else:
                below = mid
    chosen = [s.kept_float() for s in ranked[:k]]
    if ok(metrics) and k > 0:
        return FallbackResult(chosen, True, "", metrics, tried)
    missed = shortfall(metrics if limit > 0 else base_metrics, max_drop_pp, min_sqnr_db)
    reason = (f"{missed} even with {k} of {len(ranked)} layers in float" if limit > 0
              else f"{missed} and the model has {len(ranked)} quantizable layer(s): nothing to fall back")
    return FallbackResult(chosen, False, reason, metrics, tried)
