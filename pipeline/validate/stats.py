"""Numbers with their uncertainty: paired accuracy-drop intervals, latency intervals and tests.

numpy and the standard library only, so the core install (and the gate) can use it without scipy.

* ``paired_drop_interval``: exact conditional binomial (Clopper-Pearson) interval on the discordant
  pairs of paired top-1-style outcomes, mapped to the drop (b - c) / n, in percentage points.
* ``bootstrap_drop`` / ``bootstrap_drop_fn``: seeded paired bootstrap (2,000 resamples) for any
  other metric, from per-sample contributions or from a metric function over index subsets.
* ``timing_summary``: p50 with a bootstrap interval, p90/p99 and the coefficient of variation of
  raw timings.
* ``latency_regression``: Mann-Whitney U (one-sided, alpha 0.01) on two sets of raw timings and
  the p50 ratio against ``max_latency_regression_pct``.
* ``budget_verdict``: pass / fail / inconclusive ("need about N samples") of an interval vs a budget,
  N from ``samples_needed`` (the same exact interval recomputed at the observed discordance rates).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
ALPHA_LATENCY = 0.01
MAX_LATENCY_REGRESSION_PCT = 10.0
MAX_CV = 0.15  # validation.max_cv's default: a run's timings are "unstable" above it
# Below this many samples (and without ties) Mann-Whitney's p value is exact, not the normal
# approximation: the enumeration is a polynomial of degree m * n.
EXACT_MWU_MAX_TOTAL = 40
# Elements of resampled indices held in memory at once (rows of one bootstrap chunk x n).
_CHUNK_ELEMS = 2_000_000

Interval = dict[str, float | int | str | None]
# The ``method`` of the two exact intervals: ``interval_at`` recomputes them at another size.
PAIRED_METHOD = "exact conditional binomial (Clopper-Pearson)"
DISAGREEMENT_METHOD = "exact binomial (Clopper-Pearson) on disagreements"


# ---- exact binomial (Clopper-Pearson) ----------------------------------------------------------

def _binom_sf(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p), summed in log space (stable for m in the hundreds of thousands)."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, m + 1, dtype=np.float64)
    # log C(m, i) from log C(m, k) by the ratio C(m, i) / C(m, i - 1) = (m - i + 1) / i: one
    # cumulative sum instead of three lgamma calls per term, so that ``samples_needed`` can afford
    # the exact interval at hundreds of thousands of samples.
    steps = np.log((m - i[1:] + 1.0) / i[1:])
    log_ck = math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)
    terms = log_ck + np.concatenate(([0.0], np.cumsum(steps))) + i * math.log(p) + (m - i) * math.log1p(-p)
    top = float(terms.max())
    return min(1.0, math.exp(top) * float(np.exp(terms - top).sum()))


def _bisect(f: Callable[[float], float], target: float, increasing: bool) -> float:
    """The p in [0, 1] where the monotone f(p) crosses ``target`` (to ~1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def clopper_pearson(k: int, m: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion k / m (equal tails)."""
    if m <= 0:
        raise ValueError("clopper_pearson needs at least one trial")
    tail = (1.0 - confidence) / 2.0
    # lower end: P(X >= k | p) = tail; upper end: P(X <= k | p) = tail, i.e. P(X >= k + 1) = 1 - tail
    low = 0.0 if k == 0 else _bisect(lambda p: _binom_sf(k, m, p), tail, increasing=True)
    high = 1.0 if k == m else _bisect(lambda p: _binom_sf(k + 1, m, p), 1.0 - tail, increasing=True)
    return low, high


def discordant(reference_ok: Sequence[bool] | np.ndarray, candidate_ok: Sequence[bool] | np.ndarray) -> tuple[int, int, int]:
    """(b, c, n): b samples fp32 got right and the candidate wrong, c the reverse, n paired samples."""
    ref = np.asarray(reference_ok, dtype=bool).reshape(-1)
    cand = np.asarray(candidate_ok, dtype=bool).reshape(-1)
    if ref.shape != cand.shape:
        raise ValueError(f"paired outcomes differ in length: {ref.size} fp32 vs {cand.size} candidate")
    return int(np.sum(ref & ~cand)), int(np.sum(~ref & cand)), int(ref.size)


def paired_drop_interval(b: int, c: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The accuracy drop (b - c) / n in pp with its exact conditional 95 % interval.

    Conditional on the m = b + c discordant pairs, b ~ Binomial(m, p) (McNemar's exact test);
    the Clopper-Pearson interval of p maps to the drop as m (2p - 1) / n. Conditioning on m means
    the interval never reaches past m / n: with c = 0 its upper end is the point estimate, and with
    no discordant pair it is [0, 0] (for a fidelity metric use ``disagreement_interval``).
    """
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"paired counts out of range: b={b}, c={c}, n={n}")
    m = b + c
    drop = 100.0 * (b - c) / n
    if m == 0:
        low = high = 0.0
    else:
        p_lo, p_hi = clopper_pearson(b, m, confidence)
        low, high = 100.0 * m * (2 * p_lo - 1) / n, 100.0 * m * (2 * p_hi - 1) / n
    return {"drop_pp": round(drop, 4), "low_pp": round(low, 4), "high_pp": round(high, 4), "n": n,
            "b": b, "c": c, "confidence": confidence, "method": PAIRED_METHOD}


def disagreement_interval(b: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The drop of a fidelity metric (agreement with fp32, which agrees with itself on every
    sample): b disagreements of n, a plain binomial proportion, with its Clopper-Pearson interval.

    The conditional interval above would be useless here: with c = 0 by construction its upper
    end is always the point estimate b / n.
    """
    if n <= 0 or not 0 <= b <= n:
        raise ValueError(f"disagreements out of range: b={b}, n={n}")
    low, high = clopper_pearson(b, n, confidence)
    return {"drop_pp": round(100.0 * b / n, 4), "low_pp": round(100.0 * low, 4), "high_pp": round(100.0 * high, 4),
            "n": n, "b": b, "c": 0, "confidence": confidence, "method": DISAGREEMENT_METHOD}


# ---- paired bootstrap ----------------------------------------------------------------------------

def _index_chunks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resampled index rows (with replacement), ``resamples`` in all, a bounded chunk at a time."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    done = 0
    while done < resamples:
        k = min(rows, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _percentile_interval(point: float, values: np.ndarray, n: int, confidence: float, resamples: int,
                         seed: int) -> Interval:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return {"drop_pp": round(float(point), 4), "low_pp": round(float(low), 4), "high_pp": round(float(high), 4),
            "n": n, "confidence": confidence, "method": "paired bootstrap", "resamples": resamples, "seed": seed}


def bootstrap_drop(reference: Sequence[float] | np.ndarray, candidate: Sequence[float] | np.ndarray, *,
                   resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> Interval:
    """Paired bootstrap of mean(reference) - mean(candidate) from per-sample contributions.

    The contributions are in the metric's units (e.g. 100 for a correct sample of a percent
    metric); the same resampled samples go through both, so what they share cancels out.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(-1)
    if ref.shape != cand.shape or ref.size == 0:
        raise ValueError(f"paired contributions differ in length or are empty: {ref.size} vs {cand.size}")
    diff = ref - cand
    means = np.concatenate([diff[idx].mean(axis=1) for idx in _index_chunks(diff.size, resamples, seed)])
    return _percentile_interval(diff.mean(), means, diff.size, confidence, resamples, seed)


def bootstrap_drop_fn(n: int, reference_metric: Callable[[np.ndarray], float],
                      candidate_metric: Callable[[np.ndarray], float], *, resamples: int = RESAMPLES,
                      seed: int = SEED, confidence: float = CONFIDENCE) -> Interval:
    """Paired bootstrap for a metric that is not a mean of per-sample terms (mAP, user metrics).

    Each metric is called with an index array into the n paired samples (repeats included) and
    returns its value over that subset; the drop is reference - candidate on the same indices.
    """
    if n <= 0:
        raise ValueError("bootstrap_drop_fn needs at least one sample")
    everything = np.arange(n)
    point = reference_metric(everything) - candidate_metric(everything)
    drops = [reference_metric(row) - candidate_metric(row)
             for idx in _index_chunks(n, resamples, seed) for row in idx]
    return _percentile_interval(point, np.asarray(drops, dtype=np.float64), n, confidence, resamples, seed)


# ---- latency -------------------------------------------------------------------------------------

def coefficient_of_variation(timings: Sequence[float] | np.ndarray) -> float | None:
    """Sample standard deviation / mean; None with fewer than two timings."""
    t = np.asarray(timings, dtype=np.float64).reshape(-1)
    if t.size < 2 or t.mean() == 0.0:
        return None
    return float(t.std(ddof=1) / t.mean())


def p50_interval(timings: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(p50, low, high): the median of raw timings with its percentile-bootstrap interval."""
    t = np.asarray(timings, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise ValueError("no timings")
    medians = np.concatenate([np.median(t[idx], axis=1) for idx in _index_chunks(t.size, resamples, seed)])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return float(np.median(t)), float(low), float(high)


def timing_summary(timings: Sequence[float] | np.ndarray, max_cv: float | None = None, *,
                   seed: int = SEED) -> dict[str, float | int | bool | None]:
    """p50 (with its interval), p90, p99 and CV of raw timings; ``unstable`` when CV > ``max_cv``."""
    t = np.asarray(timings, dtype=np.float64).reshape(-1)
    p50, low, high = p50_interval(t, seed=seed)
    p90, p99 = np.percentile(t, [90, 99])
    cv = coefficient_of_variation(t)
    return {"p50": round(p50, 4), "p50_low": round(low, 4), "p50_high": round(high, 4),
            "p90": round(float(p90), 4), "p99": round(float(p99), 4), "cv": None if cv is None else round(cv, 4),
            "runs": int(t.size), "unstable": bool(max_cv is not None and cv is not None and cv > max_cv)}


def _rank_with_ties(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ranks (1-based) of ``values`` and the sizes of its tie groups."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0  # mean of the 1-based ranks first+1 .. first+count
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mid, counts)
    return ranks, counts


def _u_distribution(m: int, n: int) -> list[int]:
    """Counts of each U = 0 .. m n over all C(m + n, m) orderings without ties.

    They are the coefficients of the Gaussian binomial [m + n choose m]_q, built as the product of
    (1 - q^(n+i)) / (1 - q^i) for i = 1 .. m; every partial product is itself a polynomial.
    """
    poly = [1]
    for i in range(1, m + 1):
        shifted = poly + [0] * (n + i)
        for j in range(len(poly)):
            shifted[j + n + i] -= poly[j]        # times (1 - q^(n+i))
        for j in range(i, len(shifted)):
            shifted[j] += shifted[j - i]         # divided by (1 - q^i)
        poly = shifted[:i * n + 1]  # degree i n; the rest cancelled to zero
    return poly


def mann_whitney_greater(baseline: Sequence[float] | np.ndarray,
                         current: Sequence[float] | np.ndarray) -> dict[str, float | str]:
    """One-sided Mann-Whitney U: is ``current`` stochastically greater (slower) than ``baseline``?

    U counts the (baseline, current) pairs where current is larger (ties count a half). The p value
    is exact for small samples without ties, else the normal approximation with tie and
    continuity corrections.
    """
    a = np.asarray(baseline, dtype=np.float64).reshape(-1)
    b = np.asarray(current, dtype=np.float64).reshape(-1)
    m, n = a.size, b.size
    if m == 0 or n == 0:
        raise ValueError("Mann-Whitney needs timings on both sides")
    ranks, ties = _rank_with_ties(np.concatenate([a, b]))
    u = float(ranks[m:].sum() - n * (n + 1) / 2.0)
    if m + n <= EXACT_MWU_MAX_TOTAL and np.all(ties == 1):
        counts = _u_distribution(m, n)
        p = sum(counts[int(round(u)):]) / math.comb(m + n, m)
        return {"u": u, "p_value": float(p), "method": "exact"}
    total = m + n
    var = m * n / 12.0 * ((total + 1) - float(np.sum(ties ** 3 - ties)) / (total * (total - 1)))
    if var <= 0.0:  # every timing equal: nothing to tell apart
        return {"u": u, "p_value": 1.0, "method": "normal"}
    z = (u - m * n / 2.0 - 0.5) / math.sqrt(var)
    return {"u": u, "p_value": 0.5 * math.erfc(z / math.sqrt(2.0)), "method": "normal"}


def latency_regression(baseline: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, *,
                       max_regression_pct: float = MAX_LATENCY_REGRESSION_PCT,
                       alpha: float = ALPHA_LATENCY) -> dict[str, float | bool | str]:
    """A latency regression: the slowdown is significant (Mann-Whitney, alpha) *and* the p50 ratio
    is over the limit. Noise alone fails the first; a real but small slowdown fails the second."""
    test = mann_whitney_greater(baseline, current)
    p50_base, p50_cur = float(np.median(baseline)), float(np.median(current))
    ratio = p50_cur / p50_base if p50_base > 0 else math.inf
    slower_pct = (ratio - 1.0) * 100.0
    significant = test["p_value"] < alpha
    return {"p50_baseline": round(p50_base, 4), "p50_current": round(p50_cur, 4), "ratio": round(ratio, 4),
            "slower_pct": round(slower_pct, 2), "p_value": float(test["p_value"]), "significant": bool(significant),
            "limit_pct": max_regression_pct, "regressed": bool(significant and slower_pct > max_regression_pct)}


# ---- interval vs budget --------------------------------------------------------------------------

# Past this many samples the drop is, for any evaluation set one would assemble, on the budget.
MAX_SAMPLES_NEEDED = 1_000_000
# ``samples_needed`` stops refining once it is this close (relative): the answer is "about N".
_SAMPLES_TOLERANCE = 0.01


def interval_at(interval: Interval, size: int) -> Interval | None:
    """The exact interval ``size`` samples would give at the discordance rates ``interval`` observed:
    b N / n and c N / n pairs (rounded) of N, through the same function that made it. None for an
    interval without counts (bootstrap), which cannot be recomputed at another size."""
    n, b, c = int(interval["n"]), interval.get("b"), interval.get("c")  # type: ignore[arg-type]
    confidence = float(interval.get("confidence") or CONFIDENCE)  # type: ignore[arg-type]
    if b is None or c is None:
        return None
    b_n = round(int(b) * size / n)
    c_n = min(round(int(c) * size / n), size - b_n)  # two halves rounded up must not exceed N
    if interval.get("method") == PAIRED_METHOD:
        return paired_drop_interval(b_n, c_n, size, confidence)
    if interval.get("method") == DISAGREEMENT_METHOD:
        return disagreement_interval(b_n, size, confidence)
    return None


def _settled(interval: Interval, budget: float, below: bool) -> bool:
    """Does the interval exclude the budget on the point estimate's side (the gate's own comparisons)?"""
    return float(interval["high_pp"]) <= budget if below else float(interval["low_pp"]) > budget  # type: ignore[arg-type]


def _exact_samples_needed(interval: Interval, budget: float, below: bool) -> int | None:
    """The smallest N (within 1 %) at which ``interval_at(interval, N)`` settles the budget: doubling
    from n until it does, then bisecting; None when not even ``MAX_SAMPLES_NEEDED`` would."""
    lo = int(interval["n"])  # type: ignore[arg-type]
    hi = lo
    while True:
        hi = min(2 * hi, MAX_SAMPLES_NEEDED)
        if _settled(interval_at(interval, hi), budget, below):  # type: ignore[arg-type]
            break
        if hi == MAX_SAMPLES_NEEDED:
            return None
        lo = hi
    # invariant: lo does not settle it, hi does
    while hi - lo > max(1, int(hi * _SAMPLES_TOLERANCE)):
        mid = (lo + hi) // 2
        if _settled(interval_at(interval, mid), budget, below):  # type: ignore[arg-type]
            hi = mid
        else:
            lo = mid
    return hi


def _scaled_samples_needed(point: float, low: float, high: float, n: int, budget: float) -> int:
    """For an interval without counts (bootstrap): its half-width shrinking as 1 / sqrt(n) around a
    point estimate that stays, n (half / gap)^2."""
    gap = budget - point
    half = (high - point) if gap > 0 else (point - low)
    return min(MAX_SAMPLES_NEEDED, max(n + 1, math.ceil(n * (half / abs(gap)) ** 2)))


def samples_needed(interval: Interval, budget: float) -> int | None:
    """About how many samples would make a straddling interval exclude the budget, on the side of
    its point estimate; None when the point sits on the budget or not even ``MAX_SAMPLES_NEEDED``
    samples would do.

    For the exact intervals (``paired_drop_interval``, ``disagreement_interval``) the observed rates
    are held fixed, beta = b / n and gamma = c / n, and the same exact interval is recomputed at N
    samples from the counts round(beta N) and round(gamma N) (``interval_at``): for top-1,

        drop_N in 100 * m_N * (2 [p_lo, p_hi] - 1) / N,   m_N = b_N + c_N,
        [p_lo, p_hi] = Clopper-Pearson interval of b_N successes in m_N trials,

    and N is the smallest size (within 1 %) where high_N <= budget (point below the budget) or
    low_N > budget (point above it). For large N this tends to the normal approximation of the same
    interval, N ~ 1.96^2 * 100^2 * v / gap^2 with v = 4 beta gamma / (beta + gamma) for top-1
    (conditional on the discordant pairs) and v = beta (1 - beta) for fidelity; the exact search
    keeps the skew of few discordant pairs (with c = 0 the top-1 interval shrinks faster than
    1 / sqrt(N)). Intervals without counts (bootstrap) fall back to the 1 / sqrt(n) scaling of
    their own half-width.
    """
    point, low, high = (float(interval[k]) for k in ("drop_pp", "low_pp", "high_pp"))  # type: ignore[arg-type]
    if point == budget:
        return None
    if interval_at(interval, int(interval["n"])) is None:  # type: ignore[arg-type]
        return _scaled_samples_needed(point, low, high, int(interval["n"]), budget)  # type: ignore[arg-type]
    return _exact_samples_needed(interval, budget, below=point < budget)


def budget_verdict(interval: Interval, budget: float) -> dict[str, str | int | None]:
    """``pass`` when the whole interval is within the budget, ``fail`` when all of it is over,
    ``inconclusive`` (with about how many samples would settle it) when it straddles the budget."""
    point, low, high = (float(interval[k]) for k in ("drop_pp", "low_pp", "high_pp"))  # type: ignore[arg-type]
    if high <= budget:
        return {"verdict": "pass", "samples_needed": None, "message": None}
    if low > budget:
        return {"verdict": "fail", "samples_needed": None, "message": None}
    need = samples_needed(interval, budget)
    if need is not None:
        head = f"need about {need} samples"
    elif point == budget:
        head = "the drop sits on the budget, more samples won't settle it"
    else:
        head = f"need more than {MAX_SAMPLES_NEEDED} samples"
    message = (f"inconclusive: {head}; the drop's {float(interval.get('confidence') or CONFIDENCE):.0%} "  # type: ignore[arg-type]
               f"interval [{low:.2f}, {high:.2f}] pp straddles the budget {budget:.2f} pp")
    return {"verdict": "inconclusive", "samples_needed": need, "message": message}
