"""Two small models the single-input, single-output path could not take (issue 13), with their data.

``two_inputs``: an image and a vector of extras -> class logits (the extras matter: zeroing them
changes the answer). ``three_outputs``: one image -> a dict of class logits, a heatmap and an
embedding. Seeded, eval mode; data callables return ``(x, labels)`` as a spec's python source does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSES = 5


def two_inputs() -> Any:
    import torch
    import torch.nn as nn

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.extra = nn.Linear(4, 8)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(image) + self.extra(extra)))

    torch.manual_seed(0)
    return TwoInputs().eval()


def three_outputs() -> Any:
    import torch
    import torch.nn as nn

    class ThreeOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.heat = nn.Conv2d(8, 2, 1)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.logits = nn.Linear(8, CLASSES)
            self.embed = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = self.body(x)
            p = self.pool(f)
            return {"logits": self.logits(p), "heatmap": self.heat(f), "embedding": self.embed(p)}

    torch.manual_seed(1)
    return ThreeOutputs().eval()


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32)


def two_input_data(n: int = 48, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    x = {"image": _images(n, seed), "extra": rng.normal(size=(n, 4)).astype(np.float32)}
    return x, rng.integers(0, CLASSES, n)


def three_output_data(n: int = 48, seed: int = 0) -> np.ndarray:
    return _images(n, seed)
