"""Activation statistics for ncnn INT8, gathered on the fp32 ncnn model itself.

ncnn quantizes the *input blob* of each int8 layer, and pnnx renames and fuses tensors
(Conv+BN+ReLU becomes one layer whose blobs are numbered), so ONNX tensor names do not map onto
ncnn blobs. We therefore run the fp32 ncnn net on the calibration samples, extract exactly the
blobs ncnn will quantize, and hand their statistics to edgeship's calibration library
(``calibration.stats.TensorStats`` binned as ``collect_statistics`` bins them, ranges from
``calibration.observers.observe``): same observers and methods as every other backend, on the
tensors this runtime actually sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BINS = 2048  # per side, as calibration.stats.collect_statistics uses


@dataclass
class BlobStats:
    """Per-blob statistics plus the fp32 outputs of every calibration sample."""

    stats: dict[str, Any]
    """blob name -> calibration.stats.TensorStats"""
    outputs: np.ndarray
    """fp32 ncnn outputs, (N, ...) -- the reference for choosing a method on held-out samples."""


def _net(param: Path, bin_path: Path, threads: int) -> Any:
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = threads
    # keep every intermediate blob in the extractor: we read several per forward pass
    net.opt.lightmode = False
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False
    if net.load_param(str(param)) != 0 or net.load_model(str(bin_path)) != 0:
        raise RuntimeError(f"ncnn could not load {param} / {bin_path}")
    return net


def _forward(net: Any, sample: np.ndarray, input_blob: str, blobs: list[str]) -> list[np.ndarray]:
    import ncnn

    data = np.ascontiguousarray(sample, dtype=np.float32)
    ex = net.create_extractor()
    ex.set_light_mode(False)
    mat = ncnn.Mat(data)  # wraps ``data``: keep it referenced until the last extract
    ex.input(input_blob, mat)
    outs = []
    for name in blobs:
        ret, out = ex.extract(name)
        if ret != 0:
            raise RuntimeError(f"ncnn extract of blob {name!r} failed with code {ret}")
        outs.append(np.array(out, dtype=np.float32))
    del mat, data
    return outs


def collect(param: Path, bin_path: Path, input_blob: str, output_blob: str, blobs: list[str],
            samples: np.ndarray, threads: int = 2) -> BlobStats:
    """Two passes over ``samples``: min/max, then the signed histogram over [-absmax, absmax].

    Args:
        param, bin_path: the fp32 ncnn model.
        input_blob, output_blob: the model's input and output blob names.
        blobs: the blobs to observe (input blobs of the layers to quantize).
        samples: calibration samples, (N, *model input shape without batch).
        threads: ncnn threads.
    """
    from calibration.stats import TensorStats

    net = _net(param, bin_path, threads)
    wanted = list(dict.fromkeys(blobs + [output_blob]))
    lo = {b: np.inf for b in blobs}
    hi = {b: -np.inf for b in blobs}
    count = dict.fromkeys(blobs, 0)
    outputs = []
    for s in samples:
        arrays = dict(zip(wanted, _forward(net, s, input_blob, wanted)))
        outputs.append(arrays[output_blob].ravel())
        for b in blobs:
            a = arrays[b]
            lo[b], hi[b] = min(lo[b], float(a.min())), max(hi[b], float(a.max()))
            count[b] += a.size
    nb = 2 * BINS
    hists = {b: np.zeros(nb, np.int64) for b in blobs}
    for s in samples:
        for b, a in zip(blobs, _forward(net, s, input_blob, blobs)):
            amax = max(abs(lo[b]), abs(hi[b]))
            if amax == 0.0:
                hists[b][BINS] += a.size  # all zeros: first bin of the positive side
                continue
            idx = np.clip(((a.ravel() + amax) * (nb / (2 * amax))).astype(np.int64), 0, nb - 1)
            hists[b] += np.bincount(idx, minlength=nb)
    net.clear()
    stats = {b: TensorStats(b, float(lo[b]), float(hi[b]), hists[b], int(count[b])) for b in blobs}
    return BlobStats(stats, np.stack(outputs))


def thresholds(stats: dict[str, Any], method: str, percentile: float) -> dict[str, float]:
    """Symmetric clipping threshold |x| <= t per blob (ncnn's int8 is symmetric, zero point 0)."""
    from calibration.observers import observe

    return {b: max(abs(lo), abs(hi)) for b, (lo, hi) in
            ((b, observe(t, method, symmetric=True, percentile=percentile)) for b, t in stats.items())}


def extract(param: Path, bin_path: Path, input_blob: str, blobs: list[str], samples: np.ndarray,
            threads: int = 2) -> dict[str, np.ndarray]:
    """The fp32 values of ``blobs`` on ``samples``: blob -> (N, ...) with the samples on axis 0."""
    net = _net(param, bin_path, threads)
    rows = [_forward(net, s, input_blob, blobs) for s in samples]
    net.clear()
    return {b: np.stack([r[i] for r in rows]) for i, b in enumerate(blobs)}
