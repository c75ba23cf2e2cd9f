"""Rank the Conv / Linear modules of the TFLite route for the fallback (``calibration.fallback``).

Each module is scored by the output SQNR of quantizing *its weights alone* (symmetric int8,
edgeship's per-channel scales) on a few calibration samples in PyTorch: one cheap pass per
layer, lowest SQNR = most sensitive. build.py then checks candidate sets, fewest first, with the
PT2E fake-quant graph on the calibration holdout. On EfficientNet-Lite0 the stem and the first
depthwise conv stand out (about 20 dB each; every other layer is above 30 dB).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RANK_SAMPLES = 8


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return 200.0
    return 10.0 * math.log10(signal / noise) if signal > 0 else -200.0


def weight_sensitivity(module: Any, x: np.ndarray, per_channel: bool) -> dict[str, float]:
    """Output SQNR (dB) with only one layer's weights quantized, per Conv / Linear module name."""
    import torch

    from calibration.observers import weight_qparams

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    xt = torch.from_numpy(np.ascontiguousarray(x[:RANK_SAMPLES], dtype=np.float32))
    out: dict[str, float] = {}
    with torch.no_grad():
        ref = module(xt).numpy().astype(np.float64)
        for name, layer in layers:
            w = layer.weight.detach().clone()
            q = weight_qparams(w.numpy(), axis=0, per_channel=per_channel)
            scale = torch.from_numpy(np.asarray(q.scale, np.float32).reshape(-1, *([1] * (w.dim() - 1))))
            layer.weight.copy_(torch.clamp(torch.round(w / scale), -127, 127) * scale)
            out[name] = round(_sqnr_db(ref, module(xt).numpy().astype(np.float64)), 3)
            layer.weight.copy_(w)
    return out
