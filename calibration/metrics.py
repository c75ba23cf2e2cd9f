"""Fidelity metrics of a quantized model's outputs against fp32."""

from __future__ import annotations

import numpy as np

# numpy-only and shipped with every release: the device computes the same numbers as the host
from pipeline.agent.measure import agreement_within_ties, sqnr_db

__all__ = ["accuracy", "agreement_within_ties", "fidelity", "sqnr_db", "top1_agreement"]


def top1_agreement(ref: np.ndarray, test: np.ndarray, tie_margin: float = 0.0) -> float:
    """Percentage of samples whose argmax (last axis) matches fp32's.

    With ``tie_margin`` > 0 a sample also agrees when the class the quantized model picked is
    within ``tie_margin`` of fp32's top-1 in fp32's own probabilities (softmax of the outputs):
    fp32 could not tell the two apart, so the swap is not a quantization error worth gating on.
    The device agent's :func:`agreement_within_ties` is that rule, so host and device agree.
    """
    r = np.asarray(ref).reshape(ref.shape[0], -1)
    t = np.asarray(test).reshape(test.shape[0], -1).argmax(axis=1)
    if tie_margin <= 0.0:
        return float(np.mean(r.argmax(axis=1) == t) * 100.0)
    return agreement_within_ties(r, t, tie_margin)


def accuracy(out: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(np.mean(np.asarray(out).reshape(out.shape[0], -1).argmax(axis=1) == labels) * 100.0)


def fidelity(ref: np.ndarray, test: np.ndarray, labels: np.ndarray | None = None,
             tie_margin: float = 0.0) -> dict[str, float]:
    """Holdout metrics of ``test`` vs ``ref``.

    ``drop_pp`` is the accuracy drop vs fp32 when labels exist, else the top-1 disagreement
    (100 - agreement, counting fp32 near ties within ``tie_margin`` as agreement; see
    :func:`top1_agreement`); it is the quantity a ``max_drop_pp`` budget is checked against.
    ``top1_agreement`` is always the strict one.
    """
    m = {"sqnr_db": sqnr_db(ref, test), "top1_agreement": top1_agreement(ref, test), "n": float(ref.shape[0])}
    if labels is not None:
        m["accuracy"] = accuracy(test, labels)
        m["fp32_accuracy"] = accuracy(ref, labels)
        m["drop_pp"] = m["fp32_accuracy"] - m["accuracy"]
    elif tie_margin > 0.0:
        m["agreement_within_ties"] = top1_agreement(ref, test, tie_margin)
        m["drop_pp"] = 100.0 - m["agreement_within_ties"]
    else:
        m["drop_pp"] = 100.0 - m["top1_agreement"]
    return m
