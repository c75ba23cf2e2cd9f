"""Activation statistics: one calibration run, every observer served from it.

Pass 1 records per-tensor min/max; pass 2 fills a signed histogram over [-absmax, absmax]
(``2 * bins`` bins) so both the symmetric observers (which fold it into an |x| histogram of
``bins`` bins, TensorRT style) and the asymmetric ones (which need the signed shape) work from
the same data. The result is cached on disk under a key made of the model's sha256, the
calibration set's hash and the options, so choosing another method never runs the model again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import CalibrationSet
from calibration.errors import CalibrationError

STATS_FORMAT = "edgeship-stats-v1"


@dataclass
class TensorStats:
    """Statistics of one activation tensor.

    Attributes:
        name: tensor name.
        min: smallest value seen.
        max: largest value seen.
        hist: signed histogram, ``2 * bins`` counts over [-absmax, absmax].
        count: number of values seen.
        zeros: number of exact zeros (ReLU outputs); every quantizer with an integer zero
            point represents them exactly, so entropy and MSE leave them out.
        channel_mean: mean per channel (axis 1 of an N,C,... tensor, the last axis of a 2-D
            one), used by bias correction; None for other ranks.
    """

    name: str
    min: float
    max: float
    hist: np.ndarray
    count: int
    zeros: int = 0
    channel_mean: np.ndarray | None = None

    @property
    def absmax(self) -> float:
        """max(|min|, |max|)."""
        return float(max(abs(self.min), abs(self.max)))

    @property
    def bins(self) -> int:
        """Bins per side (the |x| histogram has this many)."""
        return int(self.hist.shape[0] // 2)

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin."""
        return self.absmax / self.bins if self.absmax > 0 else 0.0

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x| over [0, absmax] with :attr:`bins` bins (folded signed histogram)."""
        b = self.bins
        return self.hist[b:] + self.hist[:b][::-1]

    def nonzero_hist(self) -> np.ndarray:
        """Signed histogram without the exact zeros (they all sit in bin ``bins``)."""
        h = self.hist.copy()
        h[self.bins] = max(0, int(h[self.bins]) - self.zeros)
        return h

    def centers(self) -> np.ndarray:
        """Centers of the signed histogram's bins."""
        a = self.absmax
        edges = np.linspace(-a, a, 2 * self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2


@dataclass
class Statistics:
    """All activation statistics of one model on one calibration set.

    Attributes:
        tensors: statistics per activation tensor name (topological order).
        model_sha256: sha256 of the model file.
        calib_hash: content hash of the calibration set.
        options: the options that shaped the statistics (part of the cache key).
        cache_hit: True if loaded from the cache (the model did not run).
        model_runs: number of full passes of the model over the set (0 on a cache hit).
        seconds: time spent collecting (or loading).
    """

    tensors: dict[str, TensorStats]
    model_sha256: str
    calib_hash: str
    options: dict[str, int]
    cache_hit: bool = False
    model_runs: int = 0
    seconds: float = 0.0
    cache_path: Path | None = field(default=None)

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors


def _cache_key(model_sha: str, calib_hash: str, options: dict[str, int]) -> str:
    blob = json.dumps({"f": STATS_FORMAT, "m": model_sha, "c": calib_hash, "o": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save(path: Path, stats: Statistics) -> None:
    names = list(stats.tensors)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        names=np.array(names),
        mins=np.array([stats.tensors[n].min for n in names], np.float64),
        maxs=np.array([stats.tensors[n].max for n in names], np.float64),
        counts=np.array([stats.tensors[n].count for n in names], np.int64),
        zeros=np.array([stats.tensors[n].zeros for n in names], np.int64),
        **{f"mean_{i}": stats.tensors[n].channel_mean for i, n in enumerate(names)
           if stats.tensors[n].channel_mean is not None},
        hists=np.stack([stats.tensors[n].hist for n in names]),
        meta=np.array(json.dumps({"model": stats.model_sha256, "calib": stats.calib_hash, "options": stats.options})),
    )
    tmp.replace(path)  # atomic: a concurrent reader never sees half a cache file


def _load(path: Path) -> Statistics:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        tensors = {
            str(n): TensorStats(
                str(n), float(lo), float(hi), h.astype(np.int64), int(c), int(zc),
                z[f"mean_{i}"] if f"mean_{i}" in z.files else None,
            )
            for i, (n, lo, hi, c, h, zc) in enumerate(
                zip(z["names"], z["mins"], z["maxs"], z["counts"], z["hists"], z["zeros"])
            )
        }
    return Statistics(tensors, meta["model"], meta["calib"], meta["options"], cache_hit=True, cache_path=path)


def collect_statistics(
    model_path: Path,
    calib: CalibrationSet,
    cache_dir: Path | None = None,
    bins: int = 2048,
    batch_size: int = 16,
    threads: int | None = None,
) -> Statistics:
    """Collect (or load cached) min/max and histograms for every float activation tensor.

    Args:
        model_path: the fp32 ONNX model.
        calib: the samples to run (use the fit part; keep the holdout out of it).
        cache_dir: where to cache; None disables the cache.
        bins: histogram bins per side (|x| histogram resolution); 2048 as in TensorRT.
        batch_size: samples per inference call (a fixed-batch model uses its own).
        threads: onnxruntime intra-op threads.

    Returns:
        The statistics; ``cache_hit`` tells whether the model ran.
    """
    from calibration.graph import activation_tensors, file_sha256, load_model, model_with_outputs
    from calibration.runtime import make_session

    t0 = time.perf_counter()
    model_sha = file_sha256(model_path)
    options = {"bins": int(bins), "format": 3}
    key = _cache_key(model_sha, calib.content_hash, options)
    path = Path(cache_dir) / f"stats-{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        stats = _load(path)
        stats.seconds = time.perf_counter() - t0
        return stats

    model = load_model(model_path)
    names = activation_tensors(model)
    if not names:
        raise CalibrationError(f"model {str(model_path)!r} has no float activation tensors to calibrate")
    session = make_session(model_with_outputs(model, names).SerializeToString(), threads=threads)
    known = {o.name for o in session.get_outputs()}
    names = [n for n in names if n in known]

    mins, maxs, counts, zeros, means = _range_pass(session, calib.samples, batch_size, names)
    absmax = {n: max(abs(mins[n]), abs(maxs[n])) if counts[n] else 0.0 for n in names}
    hists = _histogram_pass(session, calib.samples, batch_size, names, absmax, bins)
    tensors = {
        n: TensorStats(
            n, float(mins[n]), float(maxs[n]), hists[n], counts[n], zeros[n],
            means[n],
        )
        for n in names
        if counts[n]
    }
    bad = [n for n, t in tensors.items() if not (np.isfinite(t.min) and np.isfinite(t.max))]
    if bad:
        raise CalibrationError(f"activation {bad[0]!r} has NaN/Inf on the calibration set; check the model/data")
    stats = Statistics(tensors, model_sha, calib.content_hash, options, cache_hit=False, model_runs=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, stats)
        stats.cache_path = path
    stats.seconds = time.perf_counter() - t0
    return stats


def _range_pass(session: Any, samples: np.ndarray, batch_size: int, names: list[str]) -> tuple[dict, ...]:
    """Pass 1: min, max, value count, exact zeros and per-channel mean of each tensor."""
    from calibration.runtime import run_batches

    mins = {n: np.inf for n in names}
    maxs = {n: -np.inf for n in names}
    counts = dict.fromkeys(names, 0)
    zeros = dict.fromkeys(names, 0)
    sums: dict[str, np.ndarray | None] = dict.fromkeys(names)
    rows = dict.fromkeys(names, 0)
    for _, outs in run_batches(session, samples, batch_size, names):
        for n, o in zip(names, outs):
            if o.size:
                mins[n] = min(mins[n], float(o.min()))
                maxs[n] = max(maxs[n], float(o.max()))
                counts[n] += int(o.size)
                zeros[n] += int(np.count_nonzero(o == 0))
                if o.ndim >= 2:
                    red = (0, *range(2, o.ndim)) if o.ndim >= 3 else (0,)
                    part = o.sum(axis=red, dtype=np.float64)
                    sums[n] = part if sums[n] is None else sums[n] + part
                    rows[n] += o.size // o.shape[1]
    means = {n: None if sums[n] is None else (sums[n] / max(1, rows[n])).astype(np.float64) for n in names}
    return mins, maxs, counts, zeros, means


def _bin_indices(x: np.ndarray, absmax: float, nb: int) -> np.ndarray:
    """Bin of each value in a signed histogram of ``nb`` bins over [-absmax, absmax]; bincount on
    computed indices is several times faster than np.histogram for millions of values."""
    idx = ((x.ravel().astype(np.float32) + absmax) * (nb / (2 * absmax))).astype(np.int64)
    return np.clip(idx, 0, nb - 1, out=idx)


def _histogram_pass(session: Any, samples: np.ndarray, batch_size: int, names: list[str],
                    absmax: dict[str, float], bins: int) -> dict[str, np.ndarray]:
    """Pass 2: the signed histogram of each tensor over [-absmax, absmax] (``2 * bins`` bins)."""
    from calibration.runtime import run_batches

    nb = 2 * bins
    hists = {n: np.zeros(nb, np.int64) for n in names}
    for _, outs in run_batches(session, samples, batch_size, names):
        for n, o in zip(names, outs):
            a = absmax[n]
            if not o.size or not np.isfinite(a):
                continue
            if a == 0.0:
                hists[n][bins] += o.size  # all zeros: first bin of the positive side
                continue
            hists[n] += np.bincount(_bin_indices(o, a, nb), minlength=nb)
    return hists


def tensor_stats_from_array(name: str, x: np.ndarray, bins: int = 2048) -> TensorStats:
    """Statistics of an in-memory array, binned exactly as :func:`collect_statistics` does."""
    x = np.asarray(x, np.float32).ravel()
    lo, hi = float(x.min()), float(x.max())
    a = max(abs(lo), abs(hi))
    nb = 2 * bins
    if a == 0.0:
        hist = np.zeros(nb, np.int64)
        hist[bins] = x.size
    else:
        hist = np.bincount(_bin_indices(x, a, nb), minlength=nb).astype(np.int64)
    return TensorStats(name, lo, hi, hist, int(x.size), int(np.count_nonzero(x == 0)))
