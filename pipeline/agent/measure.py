"""Accuracy and latency measurement on the device (numpy and the standard library only)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from .outputs import concat, pack


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB, within
    [-200, 200] so it stays JSON-able. The one implementation: the host (calibration.metrics,
    pipeline.backends.checks) imports this function, the device runs the copy it ships with."""
    ref = reference.astype(np.float64).ravel()
    noise = ref - test.astype(np.float64).ravel()
    p_noise = float(np.sum(noise * noise))
    p_signal = float(np.sum(ref * ref))
    if p_noise == 0.0:
        return 200.0
    if p_signal == 0.0:
        return -200.0
    return min(200.0, 10.0 * math.log10(p_signal / p_noise))


def agreement_within_ties(reference: np.ndarray, pred: np.ndarray, tie_margin: float) -> float:
    """Top-1 agreement (%) counting a swap between classes fp32 ranks within ``tie_margin`` of
    each other (in its softmax probabilities, or the outputs themselves if they already are
    probabilities) as agreement."""
    ref = reference.astype(np.float64)
    if not (np.all(ref >= 0.0) and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3)):
        ref = np.exp(ref - ref.max(axis=1, keepdims=True))
        ref /= ref.sum(axis=1, keepdims=True)
    picked = ref[np.arange(ref.shape[0]), pred]
    return float(np.mean(picked >= ref.max(axis=1) - tie_margin)) * 100.0


def batch_of(x: np.ndarray, start: int, batch: int) -> np.ndarray:
    """Samples ``start`` .. ``start + batch`` as float32 (copied out of the memory map), the last
    partial batch padded by repeating its last sample (a static batch takes whole batches)."""
    chunk = np.array(x[start:start + batch], dtype=np.float32)
    if chunk.shape[0] < batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - chunk.shape[0], axis=0)])
    return chunk


class KeepOutputs:
    """What ``evaluate`` returns of the raw outputs: all of them, packed (outputs.py), float16 when
    the host's metric allows, after ``postprocess`` (outputs -> outputs, numpy, per batch) if given."""

    def __init__(self, float16: bool = False, postprocess: Callable[[dict], dict] | None = None) -> None:
        self.float16 = float16
        self.postprocess = postprocess


def run_all(runner: Any, x: "np.ndarray | dict[str, np.ndarray]", batch: int,
            postprocess: Callable[[dict], dict] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Every sample once in batches: the first raw output (N, -1) and, with ``postprocess``, its
    results over all batches. With a static batch > 1 the last partial batch is padded by
    repeating its last sample and the padding is dropped from the outputs."""
    inputs = x if isinstance(x, dict) else {"": x}
    n = len(next(iter(inputs.values())))
    firsts, kept = [], []
    for start in range(0, n, batch):
        chunks = {k: batch_of(v, start, batch) for k, v in inputs.items()}
        real = min(batch, n - start)
        out = runner.run(chunks if isinstance(x, dict) else chunks[""])
        out = {k: np.asarray(v)[:real] for k, v in out.items()}
        firsts.append(np.asarray(next(iter(out.values())), dtype=np.float32).reshape(real, -1))
        kept.append(postprocess(out) if postprocess is not None else out)
    return np.concatenate(firsts, axis=0), concat(kept)


def evaluate(runner: Any, x: "np.ndarray | dict[str, np.ndarray]", labels: np.ndarray | None,
             reference: np.ndarray | None, batch: int, tie_margin: float = 0.0,
             keep: KeepOutputs | None = None) -> dict[str, Any]:
    """Run every sample once; accuracy vs labels and fidelity vs the fp32 reference outputs, both
    on the first output (the device-side fast path of ``top1`` and ``fidelity``); with ``keep``
    every output, packed, under ``outputs`` for the host to score. ``tie_margin`` > 0 adds
    ``agreement_within_ties``."""
    logits, outputs = run_all(runner, x, batch, keep.postprocess if keep is not None else None)
    n = len(logits)
    pred = logits.argmax(axis=1)
    result: dict[str, Any] = {"samples": int(n), "predictions": pred.astype(int).tolist()}
    if keep is not None and outputs is not None:
        result["outputs"] = pack(outputs, keep.float16)
    if labels is not None:
        result["accuracy"] = round(float((pred == np.asarray(labels).reshape(-1)).mean()) * 100.0, 4)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float32).reshape(n, -1)
        result["top1_agreement"] = round(float((pred == ref.argmax(axis=1)).mean()) * 100.0, 4)
        if tie_margin > 0.0:
            result["agreement_within_ties"] = round(agreement_within_ties(ref, pred, tie_margin), 4)
        result["sqnr_db"] = round(sqnr_db(ref, logits), 3)
        result["max_abs_diff"] = float(np.max(np.abs(ref - logits)))
    return result


def percentile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (numpy's default method)."""
    if not sorted_ms:
        return float("nan")
    k = (len(sorted_ms) - 1) * q / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


def time_batch(runner: Any, x: np.ndarray, runs: int) -> list[float]:
    """``runs`` timed inferences of one batch, in order. Milliseconds."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.infer(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def coefficient_of_variation(times: list[float]) -> float | None:
    """Sample standard deviation / mean (the host's validate.stats definition); None below two."""
    if len(times) < 2:
        return None
    mean = sum(times) / len(times)
    if mean == 0.0:
        return None
    return math.sqrt(sum((t - mean) ** 2 for t in times) / (len(times) - 1)) / mean


def summarize(times: list[float], warmup: int) -> dict[str, Any]:
    """p50/p90/p99, mean, stdev, min, max and CV of raw timings (ms)."""
    ordered = sorted(times)
    mean = sum(ordered) / len(ordered)
    cv = coefficient_of_variation(ordered)
    return {
        "p50": round(percentile(ordered, 50), 4),
        "p90": round(percentile(ordered, 90), 4),
        "p99": round(percentile(ordered, 99), 4),
        "mean": round(mean, 4),
        "stdev": round((cv or 0.0) * mean, 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "cv": None if cv is None else round(cv, 4),
        "runs": len(ordered),
        "warmup": warmup,
    }
