"""Decode the digit detector's raw heads into padded detections (numpy only: ships to devices).

The model predicts, on a grid of stride ``STRIDE``, a class heatmap (logits, one channel per class)
and four box channels: the centre's offset inside its cell (x, y, in cells) and the box's width and
height (in units of ``SIZE_UNIT`` pixels). Detections are the heatmap's local maxima (3x3), the
usual CenterNet decoding, which needs no separate NMS step.
"""

from __future__ import annotations

import numpy as np

STRIDE = 8
SIZE_UNIT = 16.0
TOP_K = 20
MIN_SCORE = 0.01


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def local_maxima(heat: np.ndarray) -> np.ndarray:
    """Mask of cells that equal the maximum of their 3x3 neighbourhood (per sample and class)."""
    padded = np.pad(heat, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = heat.shape[2:]
    neighbours = np.stack([padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return heat >= neighbours.max(axis=0)


def decode(heatmap: np.ndarray, box: np.ndarray, top_k: int = TOP_K) -> dict[str, np.ndarray]:
    """(N, C, H, W) logits + (N, 4, H, W) -> boxes (N, K, 4) xyxy pixels, scores (N, K), classes (N, K).

    Padding rows have score 0 (shared/decisions.md: the layout ``map`` reads).
    """
    heat = _sigmoid(np.asarray(heatmap, np.float32))
    n, c, h, w = heat.shape
    peaks = np.where(local_maxima(heat), heat, 0.0).reshape(n, -1)
    order = np.argsort(-peaks, axis=1, kind="stable")[:, :top_k]
    scores = np.take_along_axis(peaks, order, axis=1)
    classes, cell = order // (h * w), order % (h * w)
    row, col = cell // w, cell % w
    b = np.asarray(box, np.float32).reshape(n, 4, h * w)
    pick = np.take_along_axis(b, np.repeat(cell[:, None, :], 4, axis=1), axis=2)  # (N, 4, K)
    cx = (col + pick[:, 0]) * STRIDE
    cy = (row + pick[:, 1]) * STRIDE
    bw, bh = np.maximum(pick[:, 2], 0) * SIZE_UNIT, np.maximum(pick[:, 3], 0) * SIZE_UNIT
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=-1)
    keep = scores >= MIN_SCORE
    return {"boxes": np.where(keep[..., None], boxes, 0.0).astype(np.float32),
            "scores": np.where(keep, scores, 0.0).astype(np.float32),
            "classes": np.where(keep, classes, 0).astype(np.int64)}


def postprocess(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``evaluation.postprocess`` hook: raw heads by name -> padded detections."""
    return decode(outputs["heatmap"], outputs["box"])
