"""Fidelity metrics: strict top-1 agreement and agreement within fp32 near ties (known answers)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.metrics import fidelity, top1_agreement
from pipeline.agent.measure import agreement_within_ties


def _logits(probs: list[list[float]]) -> np.ndarray:
    return np.log(np.asarray(probs, np.float64))  # softmax(log p) == p


REF = _logits([[0.50, 0.49, 0.01],   # a near tie: 0.01 apart
               [0.70, 0.20, 0.10],   # decisive
               [0.40, 0.35, 0.25]])  # 0.05 apart
# the quantized model swaps the top two classes on every sample
TEST = _logits([[0.49, 0.50, 0.01], [0.20, 0.70, 0.10], [0.35, 0.40, 0.25]])


@pytest.mark.parametrize("margin,expected", [(0.0, 0.0), (0.02, 100 / 3), (0.06, 200 / 3), (0.6, 100.0)])
def test_agreement_within_ties_counts_only_swaps_fp32_could_not_tell_apart(margin, expected) -> None:
    assert top1_agreement(REF, TEST, margin) == pytest.approx(expected)
    # the device agent computes the same number from the same reference outputs
    pred = TEST.argmax(axis=1)
    assert agreement_within_ties(REF.astype(np.float32), pred, margin) == pytest.approx(expected, abs=1e-4)


def test_outputs_that_already_are_probabilities_are_not_softmaxed_again() -> None:
    p = np.exp(REF)  # softmaxed again, the gaps would be 0.004, 0.18, 0.017: 2 of 3 within 0.02
    assert top1_agreement(p, np.exp(TEST), 0.02) == pytest.approx(100 / 3)


def test_fidelity_drop_uses_the_tie_margin_and_keeps_the_strict_agreement() -> None:
    strict = fidelity(REF, TEST)
    assert strict["drop_pp"] == pytest.approx(100.0) and "agreement_within_ties" not in strict
    within = fidelity(REF, TEST, tie_margin=0.02)
    assert within["top1_agreement"] == pytest.approx(0.0)
    assert within["agreement_within_ties"] == pytest.approx(100 / 3)
    assert within["drop_pp"] == pytest.approx(200 / 3)
    # with labels the drop is the accuracy drop; the margin does not apply
    labelled = fidelity(REF, TEST, np.array([0, 0, 0]), tie_margin=0.02)
    assert labelled["drop_pp"] == pytest.approx(100.0)
