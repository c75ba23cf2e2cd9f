"""Choose the layers a TFLite INT8 model keeps in float (``calibration.fallback``).

A full-integer conversion takes minutes on a large model, so the fallback cannot try candidate
models one by one as the ncnn backend does. Instead each Conv / Linear is ranked by how much
quantizing *its weights alone* (symmetric int8, edgeship's per-channel scales) costs at the
output, on a few calibration samples in PyTorch: a cheap pass per layer. Layers whose solo
output SQNR falls below ``WEIGHT_SQNR_FLOOR_DB`` are kept float (at most ``MAX_FLOAT_FRACTION``
of them). On EfficientNet-Lite0 the stem and the first depthwise conv stand out (about 20 dB
each; every other layer is above 30 dB): those two layers carry most of the int8 error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

WEIGHT_SQNR_FLOOR_DB = 28.0
MAX_FLOAT_FRACTION = 0.1
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
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
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


def choose_float_layers(module: Any, x: np.ndarray, per_channel: bool) -> tuple[list[str], dict[str, Any]]:
    """(module names to keep float, report) -- see the module docstring."""
    scores = weight_sensitivity(module, x[:RANK_SAMPLES], per_channel)
    budget = max(1, int(len(scores) * MAX_FLOAT_FRACTION))
    ranked = sorted(scores, key=lambda n: scores[n])
    chosen = [n for n in ranked[:budget] if scores[n] < WEIGHT_SQNR_FLOOR_DB]
    report = {"rule": f"solo weight-quantization SQNR < {WEIGHT_SQNR_FLOOR_DB} dB, at most {budget} layers",
              "ranked_on_samples": int(min(len(x), RANK_SAMPLES)),
              "lowest_sqnr_db": {n: scores[n] for n in ranked[:max(budget, 3)]}}
    return chosen, report
