"""Evaluation inputs shipped as uint8 pixels and normalised on the device.

An image source is decoded, resized and cropped on the host (Pillow); the release ships the
resulting uint8 pixels, losslessly compressed, and a small recipe. The device turns them into the
model's float32 input with :func:`normalise`, the same function the host used for the samples its
fp32 reference was computed from (``calibration.data.ImagePreprocess.normalise`` calls it), so
both sides feed the model bit-identical arrays.

Storage (:func:`write_pixels`): a ``.npz`` with one member per sample (``"0"``, ``"1"``, ...),
each the sample after PNG's Sub filter (every byte minus the byte ``stride`` before it, mod 256;
``stride`` = channels, i.e. the same channel of the pixel to the left), deflated. A worker decodes
only the batch it feeds (:class:`PixelSamples`), so the evaluation set never sits in its heap.

Standard library and numpy only: this ships to the device; the host imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ENCODING = "uint8-sub-deflate"
LAYOUTS = ("NCHW", "NHWC", "stored")


def recipe(scale: float, mean: "list[float] | tuple[float, ...]", std: "list[float] | tuple[float, ...]",
           layout: str, stride: int) -> dict[str, Any]:
    """The agent config's description of one input: ``(pixels * scale - mean) / std`` per channel
    (the last axis of the stored pixels), float32, then laid out: ``NCHW`` moves the channel axis
    before height and width, ``NHWC`` and ``stored`` keep the stored order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return {"encoding": ENCODING, "dtype": "float32", "scale": float(scale), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "layout": layout, "stride": int(stride)}


def table(how: dict[str, Any], channels: int) -> np.ndarray:
    """(channels, 256) float32: ``(level * scale - mean[c]) / std[c]`` for every uint8 level.

    float32 multiply, subtract and divide are correctly rounded on every machine, so the table,
    and every sample looked up in it, is bit-identical on the host and on the device."""
    levels = np.arange(256, dtype=np.float32)[:, None] * np.float32(how["scale"])
    values = (levels - np.asarray(how["mean"], np.float32)) / np.asarray(how["std"], np.float32)
    return np.ascontiguousarray(np.broadcast_to(values, (256, channels)).T)


def normalise(pixels: np.ndarray, how: dict[str, Any]) -> np.ndarray:
    """(..., H, W, C) uint8 -> float32 ``(pixels * scale - mean) / std`` in the recipe's layout.

    One implementation for the host's samples and the device's: a lookup in :func:`table` (256
    values per channel), the arithmetic done once per level instead of once per pixel (10x faster
    than computing every pixel; the same bits)."""
    channels = pixels.shape[-1]
    lut = table(how, channels)
    if how["layout"] == "NCHW":
        return lut[np.arange(channels).reshape(channels, 1, 1), np.moveaxis(pixels, -1, -3)]
    return lut[np.arange(channels), pixels]


def sub_filter(sample: np.ndarray, stride: int) -> np.ndarray:
    """One uint8 sample, flattened, minus itself shifted by ``stride`` (mod 256): neighbouring
    pixels are alike, so the differences are small and deflate far better than the pixels."""
    flat = np.ascontiguousarray(sample, dtype=np.uint8).reshape(-1)
    out = flat.copy()
    out[stride:] -= flat[:-stride]
    return out


def unfilter(filtered: np.ndarray, stride: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`sub_filter`: a running sum mod 256 down each of the ``stride`` lanes."""
    lanes = np.asarray(filtered, dtype=np.uint8).reshape(-1, stride)
    return np.cumsum(lanes, axis=0, dtype=np.uint8).reshape(shape)


def write_pixels(path: Path, pixels: np.ndarray, stride: int) -> None:
    """``pixels`` (N, ...) uint8 -> ``path`` (.npz), one Sub-filtered, deflated member per sample."""
    if pixels.dtype != np.uint8 or pixels.ndim < 2 or pixels[0].size % stride:
        raise ValueError(f"pixels must be uint8 (N, ...) with a sample size divisible by {stride}, "
                         f"got {pixels.dtype} {pixels.shape}")
    members = {str(i): sub_filter(s, stride) for i, s in enumerate(pixels)}
    members["shape"] = np.asarray(pixels.shape, dtype=np.int64)
    np.savez_compressed(path, **members)


class PixelSamples:
    """A release's ``.npz`` of pixels as the model's float32 samples, decoded per slice.

    Supports what the agent asks of an evaluation array: ``len``, ``shape`` and slicing."""

    def __init__(self, path: Path, how: dict[str, Any]) -> None:
        if how.get("encoding") != ENCODING:
            raise ValueError(f"{path}: encoding {how.get('encoding')!r}, this agent reads {ENCODING!r}")
        self.how = how
        self.npz = np.load(path, allow_pickle=False)
        stored = tuple(int(d) for d in self.npz["shape"])
        self.count, self.sample_shape = stored[0], stored[1:]
        one = normalise(np.zeros((1, *self.sample_shape), np.uint8), how)
        self.shape = (self.count, *one.shape[1:])

    def __len__(self) -> int:
        return self.count

    def pixels(self, index: int) -> np.ndarray:
        """Sample ``index`` as the uint8 pixels the host stored."""
        return unfilter(self.npz[str(index)], int(self.how["stride"]), self.sample_shape)

    def __getitem__(self, key: "int | slice") -> np.ndarray:
        if isinstance(key, slice):
            rows = range(*key.indices(self.count))
            stack = np.stack([self.pixels(i) for i in rows]) if len(rows) else \
                np.zeros((0, *self.sample_shape), np.uint8)
            return normalise(stack, self.how)
        index = int(key) + self.count if int(key) < 0 else int(key)
        if not 0 <= index < self.count:
            raise IndexError(f"sample {key} of {self.count}")
        return normalise(self.pixels(index)[None], self.how)[0]
