"""Range observers (min-max, percentile, entropy/KL, MSE) and quantization parameters.

Every observer reads a :class:`~calibration.stats.TensorStats` and returns a float range
``(lo, hi)``. In symmetric mode the range is ``(-t, t)``; in asymmetric mode a non-negative
tensor (after ReLU) gets ``(0, t)`` and a mixed-sign tensor gets ``(lo, hi)``.
:func:`qparams` then turns the range into (scale, zero point, dtype).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from calibration.config import METHODS
from calibration.errors import CalibrationConfigError
from calibration.stats import Statistics, TensorStats

INT8_SYM_MAX = 127  # symmetric int8 uses [-127, 127] so that zero point 0 is exact (TensorRT)
UINT8_MAX = 255
SPIKE_SHARE = 0.05  # a histogram bin with more than this share of the mass is a "spike"


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor (per-tensor) or one weight (per-channel).

    Attributes:
        scale: float scale(s).
        zero_point: integer zero point(s).
        dtype: "int8" or "uint8".
        axis: channel axis for per-channel parameters, None for per-tensor.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None


def _threshold_index_to_value(t: TensorStats, k: int) -> float:
    """Upper edge of the k-th |x| bin (k counts bins kept, 1..bins)."""
    return min(t.absmax, k * t.bin_width)


def percentile_threshold(h: np.ndarray, width: float, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of the histogram mass lies."""
    total = h.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(h) / total
    k = int(np.searchsorted(cdf, percentile / 100.0, side="left")) + 1
    return min(k, h.shape[0]) * width


def entropy_threshold(h: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT entropy calibration: the clip that minimizes KL(P || Q).

    For each candidate i in [levels, len(h)], P is the histogram of the first i bins with the
    clipped tail added to its last bin, and Q is P's support quantized into ``levels`` levels
    (bins merged in groups, each group's mass spread evenly over its non-empty bins). A P bin
    with no Q mass (the tail-loaded last bin over an empty bin) gets Q = 1e-12, TensorRT-style
    smoothing that keeps the divergence finite but large.

    The KL of every candidate is evaluated at once from prefix sums (per group: mass, non-empty
    count; per bin: h log h), O(candidates x levels) instead of O(candidates x bins) Python work.

    Args:
        h: |x| histogram (TensorRT uses 2048 bins).
        width: bin width.
        levels: quantization levels (128 for signed int8, 256 for unsigned).

    Returns:
        The threshold: the upper edge of the best candidate's last bin.
    """
    h = h.astype(np.float64)
    nbins = h.shape[0]
    total = h.sum()
    if nbins <= levels or total == 0:
        return nbins * width
    zero = np.zeros(1)
    cum_h = np.concatenate([zero, np.cumsum(h)])
    cum_nz = np.concatenate([zero, np.cumsum(h > 0)])
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cum_hlogh = np.concatenate([zero, np.cumsum(hlogh)])

    cand = np.arange(levels, nbins + 1)  # i: bins kept
    starts = (np.arange(levels)[None, :] * cand[:, None]) // levels
    ends = np.concatenate([starts[:, 1:], cand[:, None]], axis=1)
    g_mass = cum_h[ends] - cum_h[starts]
    g_nz = cum_nz[ends] - cum_nz[starts]
    per_bin = np.divide(g_mass, g_nz, out=np.ones_like(g_mass), where=g_nz > 0)
    g_term = np.where(g_mass > 0, g_mass * np.log(np.where(g_mass > 0, per_bin, 1.0)), 0.0).sum(axis=1)

    last = h[cand - 1]
    tail = total - cum_h[cand]
    kept = total - tail  # = sum of Q before normalization
    p_last_q = per_bin[:, -1]  # Q mass per non-empty bin of the last group
    log_n, log_qs = np.log(total), np.log(np.maximum(kept, 1e-300))
    n1 = cum_h[cand - 1]  # mass of the bins before the last one
    # bins j < i-1: sum h_j [log h_j - log N - log q_j + log qs]
    a = cum_hlogh[cand - 1] - n1 * (log_n - log_qs) - (g_term - np.where(last > 0, last * np.log(p_last_q), 0.0))
    # last bin: p = h_{i-1} + tail against its Q (or the smoothing floor if the bin is empty)
    pl = last + tail
    log_q_norm = np.where(last > 0, np.log(np.where(last > 0, p_last_q, 1.0)) - log_qs, np.log(1e-12))
    b = np.where(pl > 0, pl * (np.log(np.where(pl > 0, pl, 1.0)) - log_n - log_q_norm), 0.0)
    kl = (a + b) / total
    kl = np.where(kept > 0, kl, np.inf)
    return float(cand[int(np.argmin(kl))] * width)


def mse_threshold(h: np.ndarray, width: float, levels: int) -> float:
    """Clip t minimizing expected squared error: in-range rounding noise + clipped tail.

    E(t) = sum_{x<=t} c(x) * d^2/12 + sum_{x>t} c(x) (x - t)^2 with d = t / levels, evaluated
    for every bin edge in O(bins) with suffix sums of c, c*x and c*x^2.

    Args:
        h: |x| histogram (for a non-negative tensor, its positive histogram).
        width: bin width.
        levels: quantization steps covering [0, t] (127 for int8 symmetric, 255 for uint8).
    """
    h = h.astype(np.float64)
    n = h.shape[0]
    if h.sum() == 0:
        return n * width
    x = (np.arange(n) + 0.5) * width
    t = np.arange(1, n + 1) * width  # candidate thresholds: upper bin edges
    s0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((h * x)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((h * x * x)[::-1])[::-1], [0.0]])
    k = np.arange(1, n + 1)  # bins kept
    inside = s0[0] - s0[k]
    clip_err = s2[k] - 2 * t * s1[k] + t * t * s0[k]
    err = inside * (t / levels) ** 2 / 12.0 + clip_err
    return float(t[int(np.argmin(err))])


def _mse_range_signed(t: TensorStats, levels: int = UINT8_MAX, grid: int = 128) -> tuple[float, float]:
    """Asymmetric MSE range for a mixed-sign tensor: grid search over (lo, hi) clip pairs.

    Candidates are histogram bin edges; clipping errors below lo and above hi come from prefix
    and suffix sums of c, c*x, c*x^2, so the grid costs O(grid^2), not O(grid^2 * bins).
    """
    c = t.nonzero_hist().astype(np.float64)
    x = t.centers()
    nb = c.shape[0]
    edges = np.linspace(-t.absmax, t.absmax, nb + 1)
    zero = np.zeros(1)
    p0 = np.concatenate([zero, np.cumsum(c)])
    p1 = np.concatenate([zero, np.cumsum(c * x)])
    p2 = np.concatenate([zero, np.cumsum(c * x * x)])
    # candidate edge indices: lo edges in [first used bin, zero], hi edges in [zero, last used]
    used = np.flatnonzero(t.hist)
    first, last, mid = int(used[0]), int(used[-1]) + 1, nb // 2
    lo_idx = np.unique(np.linspace(first, mid, grid).astype(np.int64))
    hi_idx = np.unique(np.linspace(mid, last, grid).astype(np.int64))
    lo_v, hi_v = edges[lo_idx], edges[hi_idx]
    # below lo: sum c (x - lo)^2 over bins < lo_idx
    below = p2[lo_idx] - 2 * lo_v * p1[lo_idx] + lo_v**2 * p0[lo_idx]
    # above hi: sum c (x - hi)^2 over bins >= hi_idx
    a0, a1, a2 = p0[-1] - p0[hi_idx], p1[-1] - p1[hi_idx], p2[-1] - p2[hi_idx]
    above = a2 - 2 * hi_v * a1 + hi_v**2 * a0
    inside = p0[hi_idx][None, :] - p0[lo_idx][:, None]
    step = (hi_v[None, :] - lo_v[:, None]) / levels
    err = below[:, None] + above[None, :] + inside * step**2 / 12.0
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(min(lo_v[i], 0.0)), float(max(hi_v[j], 0.0))


def observe(
    t: TensorStats,
    method: str,
    symmetric: bool,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """Range of one tensor under one method and mode.

    Args:
        t: the tensor's statistics.
        method: one of :data:`METHODS`.
        symmetric: signed int8 with zero point 0 (True) or uint8 with zero point (False).
        percentile: percentile of |x| kept by the "percentile" method.

    Returns:
        (lo, hi), with lo <= 0 <= hi.
    """
    if method not in METHODS:
        raise CalibrationConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    lo, hi = min(t.min, 0.0), max(t.max, 0.0)
    if method == "minmax" or t.absmax == 0.0:
        if symmetric:
            a = max(-lo, hi)
            return -a, a
        return lo, hi
    nonneg = t.min >= 0.0
    # unsigned after ReLU uses all 255 steps on [0, t]; signed int8 has 127 per side
    levels_kl, levels_mse = (256, UINT8_MAX) if (nonneg and not symmetric) else (128, INT8_SYM_MAX)
    # exact zeros (half of a ReLU output) are represented exactly by any zero point; left in,
    # their spike in the first bin drags the entropy search to absurdly small thresholds
    signed = t.nonzero_hist()
    h = signed[t.bins :] if nonneg else signed[t.bins :] + signed[: t.bins][::-1]
    w = t.bin_width
    if not symmetric and not nonneg:
        if method == "mse":
            return _mse_range_signed(t)
        if method == "percentile":
            cdf = np.cumsum(t.hist) / max(1, t.hist.sum())
            x_edges = np.linspace(-t.absmax, t.absmax, 2 * t.bins + 1)
            k_lo = int(np.searchsorted(cdf, 1.0 - percentile / 100.0, side="left"))
            k_hi = int(np.searchsorted(cdf, percentile / 100.0, side="left")) + 1
            return max(lo, min(0.0, float(x_edges[k_lo]))), min(hi, max(0.0, float(x_edges[k_hi])))
    if method == "percentile":
        full = t.hist[t.bins :] if nonneg else t.abs_hist()
        thr = percentile_threshold(full, w, percentile)
    elif method == "entropy":
        # Spike guard (our addition to TensorRT's algorithm): a single bin holding a large share
        # of the mass (MNIST's background pixel value, a saturated ReLU6) is one value, cheap to
        # represent, but KL charges for smearing it across its merge group and so picks a
        # threshold right at the spike, clipping everything above it. Spikes are left out of
        # the KL histogram and the threshold never cuts below them.
        spikes = np.flatnonzero(h > SPIKE_SHARE * max(1, h.sum()))
        if spikes.size:
            h = h.copy()
            h[spikes] = 0
        thr = entropy_threshold(h, w, levels_kl)
        if spikes.size:
            thr = max(thr, (int(spikes[-1]) + 1) * w)
    else:
        thr = mse_threshold(h, w, levels_mse)
    thr = float(min(max(thr, w), t.absmax))
    if symmetric:
        return -thr, thr
    if nonneg:
        return 0.0, thr
    return max(lo, -thr), min(hi, thr)  # entropy on a mixed-sign tensor, asymmetric mode


def compute_ranges(
    stats: Statistics,
    method: str,
    symmetric: bool = True,
    percentile: float = 99.99,
    names: Iterable[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Ranges of every (or the named) activation tensor(s) under one method.

    Returns:
        tensor name -> (lo, hi).
    """
    keys = list(stats.tensors) if names is None else [n for n in names if n in stats.tensors]
    return {n: observe(stats.tensors[n], method, symmetric, percentile) for n in keys}


def qparams(lo: float, hi: float, symmetric: bool) -> QParams:
    """Per-tensor activation quantization parameters from a range.

    Symmetric: int8, zero point 0, scale = max(|lo|, |hi|) / 127.
    Asymmetric: uint8, scale = (hi - lo) / 255 with 0 inside the range, zero point
    round(-lo / scale) (0 for a non-negative tensor).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(-lo, hi)
        scale = a / INT8_SYM_MAX if a > 0 else 1.0
        return QParams(np.array(scale, np.float32), np.array(0, np.int8), "int8")
    span = hi - lo
    scale = span / UINT8_MAX if span > 0 else 1.0
    zp = int(np.clip(round(-lo / scale), 0, UINT8_MAX))
    return QParams(np.array(scale, np.float32), np.array(zp, np.uint8), "uint8")


def weight_qparams(
    w: np.ndarray,
    axis: int,
    per_channel: bool = True,
    bias: np.ndarray | None = None,
    input_scale: float | None = None,
) -> QParams:
    """Symmetric int8 weight parameters: scale = absmax / 127 per output channel (or tensor).

    With ``bias`` and ``input_scale`` the scale is floored so that the int32 bias (scale
    input_scale * weight_scale) cannot overflow: a near-dead channel (weights ~1e-9 after BN
    folding, bias ~0.5) would otherwise get its bias clipped to ~0 and corrupt the whole
    channel. Its weights then round to zero, which they nearly are. A channel of zeros gets
    scale 1 (any scale represents it exactly; 0 would divide by zero).
    """
    w = np.asarray(w, np.float32)
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red)
    else:
        amax = np.array(np.abs(w).max())
    scale = np.where(amax > 0, amax / INT8_SYM_MAX, 1.0).astype(np.float64)
    if bias is not None and input_scale is not None and input_scale > 0:
        b = np.abs(np.asarray(bias, np.float64))
        b = b if per_channel else np.array(b.max() if b.size else 0.0)
        # 2**30 leaves a 2x margin below int32's limit for the accumulated products
        scale = np.maximum(scale, b / (float(input_scale) * 2.0**30))
    scale = scale.astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int8), "int8", axis if per_channel else None)


def fake_quant(x: np.ndarray, q: QParams) -> np.ndarray:
    """Quantize-dequantize ``x`` with per-tensor ``q`` (reference for tests and simulation)."""
    lo, hi = (-128, 127) if q.dtype == "int8" else (0, 255)
    s, z = float(q.scale), float(q.zero_point)
    return ((np.clip(np.round(x / s) + z, lo, hi) - z) * s).astype(np.float32)
