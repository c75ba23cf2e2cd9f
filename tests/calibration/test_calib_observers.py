"""Observers on synthetic tensors with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.observers import (
    QParams,
    compute_ranges,
    entropy_threshold,
    fake_quant,
    observe,
    qparams,
    weight_qparams,
)
from calibration.stats import Statistics, tensor_stats_from_array


def _kl_reference(h: np.ndarray, width: float, levels: int) -> float:
    """Straightforward per-candidate loop of TensorRT's entropy calibration (slow, obvious)."""
    h = h.astype(np.float64)
    best_i, best = h.shape[0], np.inf
    for i in range(levels, h.shape[0] + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        nz = h[:i] > 0
        q = np.zeros(i)
        starts = (np.arange(levels) * i) // levels
        ends = np.append(starts[1:], i)
        for s, e in zip(starts, ends):
            n = nz[s:e].sum()
            if n:
                q[s:e] = np.where(nz[s:e], h[s:e].sum() / n, 0.0)
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = np.sum(p[m] * np.log(p[m] / np.where(q[m] > 0, q[m], 1e-12)))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


@pytest.fixture(scope="module")
def gauss_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    x[:4] = [-18.0, -15.0, 16.0, 20.0]  # rare, large outliers
    return x


def test_entropy_vectorized_matches_reference_loop() -> None:
    rng = np.random.default_rng(1)
    for x in (np.abs(rng.normal(size=50_000)), rng.exponential(size=50_000), rng.uniform(0, 1, 50_000)):
        x[:3] = 30.0 * x.max()
        t = tensor_stats_from_array("t", x, bins=512)
        h = t.hist[t.bins :]
        assert entropy_threshold(h, t.bin_width, 128) == pytest.approx(_kl_reference(h, t.bin_width, 128))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gaussian_with_outliers_clipped_except_minmax(gauss_outliers: np.ndarray, symmetric: bool) -> None:
    t = tensor_stats_from_array("g", gauss_outliers)
    lo, hi = observe(t, "minmax", symmetric)
    assert max(-lo, hi) == pytest.approx(t.absmax)  # min-max never clips
    for method in ("percentile", "entropy"):
        lo, hi = observe(t, method, symmetric, percentile=99.99)
        # the Gaussian body (|x| <= ~4.5) is kept, the outliers (>= 15) are clipped
        assert 2.5 < hi < 10.0, (method, hi)
        assert -10.0 < lo < -2.5, (method, lo)
    # MSE trades clipping error against rounding noise: it clips the outliers, but only as
    # far as four squared outlier errors are worth the noise on 200k body values
    lo, hi = observe(t, "mse", symmetric)
    assert 2.5 < hi < 0.8 * t.absmax and -0.8 * t.absmax < lo < -2.5, (lo, hi)


def test_uniform_keeps_nearly_full_range() -> None:
    x = np.random.default_rng(2).uniform(-1, 1, 200_000)
    t = tensor_stats_from_array("u", x)
    for method in ("minmax", "percentile", "entropy", "mse"):
        for symmetric in (True, False):
            lo, hi = observe(t, method, symmetric)
            assert hi > 0.97 and lo < -0.97, (method, symmetric, lo, hi)


def test_relu_tensor_asymmetric_is_uint8_zero_point_zero() -> None:
    x = np.maximum(np.random.default_rng(3).normal(size=100_000), 0)
    t = tensor_stats_from_array("r", x)
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = observe(t, method, symmetric=False)
        assert lo == 0.0 and hi > 2.0
        q = qparams(lo, hi, symmetric=False)
        assert q.dtype == "uint8" and int(q.zero_point) == 0
        assert float(q.scale) == pytest.approx(hi / 255, rel=1e-6)


def test_symmetric_qparams_zero_point_zero_int8() -> None:
    q = qparams(-0.5, 2.54, symmetric=True)
    assert q.dtype == "int8" and int(q.zero_point) == 0
    assert float(q.scale) == pytest.approx(2.54 / 127, rel=1e-6)


def test_asymmetric_mixed_sign_zero_point() -> None:
    q = qparams(-1.0, 3.0, symmetric=False)
    assert float(q.scale) == pytest.approx(4.0 / 255, rel=1e-6)
    assert int(q.zero_point) == round(1.0 / (4.0 / 255))


def test_clipping_lowers_quantization_error_on_gaussian(gauss_outliers: np.ndarray) -> None:
    t = tensor_stats_from_array("g", gauss_outliers)
    body = gauss_outliers[np.abs(gauss_outliers) < 5]

    def err(method: str) -> float:
        q = qparams(*observe(t, method, True), symmetric=True)
        return float(np.mean((fake_quant(body, q) - body) ** 2))

    assert err("mse") < err("minmax") / 2
    assert err("entropy") < err("minmax") / 4


def test_weight_per_channel_scales() -> None:
    w = np.zeros((4, 3, 2, 2), np.float32)
    w[0, 0, 0, 0] = -2.54
    w[1, 1, 1, 1] = 1.27
    w[3, 2, 0, 1] = 0.127
    q = weight_qparams(w, axis=0)
    assert q.axis == 0 and q.dtype == "int8" and not q.zero_point.any()
    np.testing.assert_allclose(q.scale, [0.02, 0.01, 1.0, 0.001], rtol=1e-6)  # zero channel -> 1
    g = weight_qparams(np.ones((5, 7)), axis=1)  # Gemm B without transB: output axis 1
    assert g.scale.shape == (7,)


def test_compute_ranges_every_tensor() -> None:
    rng = np.random.default_rng(4)
    tensors = {n: tensor_stats_from_array(n, rng.normal(size=1000)) for n in ("a", "b")}
    stats = Statistics(tensors, "m", "c", {})
    r = compute_ranges(stats, "percentile", symmetric=True, percentile=99.0)
    assert set(r) == {"a", "b"} and all(lo == -hi for lo, hi in r.values())
    assert isinstance(qparams(*r["a"], True), QParams)


def test_entropy_spike_guard_keeps_the_body() -> None:
    # MNIST-like input: 80% of pixels at the background value, the strokes spread up to 2.8
    rng = np.random.default_rng(5)
    x = np.full(100_000, -0.42, np.float32)
    x[:20_000] = rng.uniform(-0.42, 2.82, 20_000)
    t = tensor_stats_from_array("img", x)
    lo, hi = observe(t, "entropy", symmetric=True)
    assert hi > 2.0  # without the guard KL clips at the spike (~0.42), destroying the strokes
