"""Rank the Conv / Linear modules of the TFLite route for the fallback (``calibration.fallback``).

The ranking is the one ONNX Runtime's fallback uses: ``calibration.sensitivity.layer_sensitivity``
on the gated fake-quant ONNX model (``calibration.simulate``) with the same calibration plan the
PT2E observers took, i.e. how much holdout output SQNR leaving each layer alone in float buys.
That sees what makes a layer sensitive for real, a per-tensor activation range stretched by one
channel as much as coarse weights. The ONNX layers are then paired with the PyTorch modules
(:func:`pair_modules`): same weight shape and the same input values on a calibration batch, so
fused BatchNorm and renamed tensors do not matter.

A module with no ONNX twin (or a route without a plan: ``ort-default``) is ranked by the output
SQNR of quantizing *its weights alone* (:func:`weight_sensitivity`) after the paired ones.
build.py then checks candidate sets, fewest first, with the PT2E fake-quant graph on the whole
calibration holdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration.metrics import sqnr_db
from calibration.sensitivity import LayerSensitivity

RANK_SAMPLES = 8  # samples for the weight-only ranking
SENSITIVITY_SAMPLES = 16  # holdout samples for the gated ONNX ranking (as quantize_onnx)


def _layers(module: Any) -> list[tuple[str, Any]]:
    import torch

    return [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def weight_sensitivity(module: Any, x: np.ndarray, per_channel: bool, only: set[str] | None = None) -> dict[str, float]:
    """Output SQNR (dB) with only one layer's weights quantized, per Conv / Linear module name
    (those in ``only``, if given)."""
    import torch

    from calibration.observers import weight_qparams

    xt = torch.from_numpy(np.array(x[:RANK_SAMPLES], dtype=np.float32))
    out: dict[str, float] = {}
    with torch.no_grad():
        ref = module(xt).numpy().astype(np.float64)
        for name, layer in _layers(module):
            if only is not None and name not in only:
                continue
            w = layer.weight.detach().clone()
            q = weight_qparams(w.numpy(), axis=0, per_channel=per_channel)
            scale = torch.from_numpy(np.asarray(q.scale, np.float32).reshape(-1, *([1] * (w.dim() - 1))))
            layer.weight.copy_(torch.clamp(torch.round(w / scale), -127, 127) * scale)
            out[name] = round(sqnr_db(ref, module(xt).numpy().astype(np.float64)), 3)
            layer.weight.copy_(w)
    return out


def pair_modules(module: Any, x: np.ndarray, model: Any, onnx_values: dict[str, np.ndarray],
                 tol: float | None = None) -> dict[str, str]:
    """PyTorch Conv / Linear module name -> ONNX weighted node name.

    A module pairs with the ONNX node whose weight has the same shape (up to the transposed
    layout of Gemm / MatMul weights) and whose input holds the same values on ``x`` (relative L2
    error below ``tol``); where several qualify (one input read by twin layers), graph order
    decides. Modules without a twin are left out.

    Args:
        module: the fp32 PyTorch model, in the ONNX model's input layout.
        x: samples (the ones ``onnx_values`` were computed on).
        model: the fp32 ONNX model (node names as ``calibration.graph.ensure_node_names`` gives).
        onnx_values: ``calibration.transfer.onnx_activations(model, x)``.
    """
    from onnx import numpy_helper

    from calibration.graph import weighted_layers
    from calibration.transfer import MATCH_TOL

    from pipeline.backends.tflite.ranges import module_inputs

    tol = MATCH_TOL if tol is None else tol
    seen = module_inputs(module, dict(_layers(module)), x)
    shapes = {i.name: tuple(sorted(numpy_helper.to_array(i).shape)) for i in model.graph.initializer}
    free = list(weighted_layers(model))
    out: dict[str, str] = {}
    for name, layer in _layers(module):
        if name not in seen:
            continue
        ours = seen[name].astype(np.float64).ravel()
        norm = max(float(np.linalg.norm(ours)), 1e-12)
        for cand in free:
            theirs = onnx_values.get(cand.inputs[0]) if cand.inputs else None
            if (shapes.get(cand.weight) != tuple(sorted(layer.weight.shape)) or theirs is None
                    or theirs.size != ours.size):
                continue
            if float(np.linalg.norm(theirs.astype(np.float64).ravel() - ours)) / norm <= tol:
                out[name] = cand.node
                free.remove(cand)
                break
    return out


def gated_ranking(onnx_path: Path, plan: Any, holdout: np.ndarray, threads: int | None = None) -> tuple[Any, list[LayerSensitivity]]:
    """The ONNX model (named nodes) and its layers, most sensitive first, under ``plan``
    (``calibration.sensitivity.layer_sensitivity`` on ``SENSITIVITY_SAMPLES`` holdout samples)."""
    from calibration.graph import ensure_node_names, load_model, weighted_layers
    from calibration.sensitivity import layer_sensitivity
    from calibration.simulate import build_gated_model

    model = load_model(onnx_path)
    ensure_node_names(model)
    layers = weighted_layers(model)
    gated = build_gated_model(model, layers, plan.acts, plan.weights, threads, plan.bias)
    x = np.ascontiguousarray(holdout[:SENSITIVITY_SAMPLES], dtype=np.float32)
    ref = gated.run(x, np.zeros(len(layers), bool))
    return model, layer_sensitivity(gated, x, ref)


def rank_modules(module: Any, fit: np.ndarray, holdout: np.ndarray, per_channel: bool, onnx_path: Path | None = None,
                 plan: Any = None, onnx_values: dict[str, np.ndarray] | None = None,
                 threads: int | None = None) -> list[LayerSensitivity]:
    """Conv / Linear module names, most sensitive first (see the module docstring).

    Args:
        module: fp32 PyTorch model in the ONNX input layout (not modified).
        fit: calibration fit samples (``onnx_values`` holds the ONNX activations of the first ones).
        holdout: calibration holdout samples (ONNX layout).
        per_channel: weight quantization of the route (for the weight-only ranking).
        onnx_path, plan, onnx_values: the fp32 ONNX model, the calibration plan the PT2E graph
            took and ``onnx_activations`` on ``fit[:len(any value)]``; without them every
            module is ranked by weight-only SQNR.

    Returns:
        LayerSensitivity per module: ``saved_db`` / ``saved_pp`` from the gated ONNX model for a
        paired module (``op`` names its ONNX node), ``sqnr_db`` = weight-only SQNR for the rest.
    """
    ranked: list[LayerSensitivity] = []
    if onnx_path is not None and plan is not None and onnx_values:
        model, gated = gated_ranking(onnx_path, plan, holdout, threads)
        n = next(iter(onnx_values.values())).shape[0]
        to_module = {node: name for name, node in pair_modules(module, fit[:n], model, onnx_values).items()}
        ranked = [LayerSensitivity(to_module[s.name], f"onnx {s.name}", float("nan"), s.saved_db, s.saved_pp)
                  for s in gated if s.name in to_module]
    rest = {name for name, _ in _layers(module)} - {s.name for s in ranked}
    solo = weight_sensitivity(module, fit, per_channel, rest) if rest else {}
    return ranked + [LayerSensitivity(n, "weights only", solo[n], float("nan"), 0.0)
                     for n in sorted(solo, key=lambda n: solo[n])]
