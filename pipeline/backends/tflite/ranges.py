"""Give the PT2E graph of the TFLite route the calibration plan's activation ranges.

The TFLite route leaves from PyTorch, so its activation observers sit on FX nodes, not ONNX
tensors. After the observers have seen the fit samples, we run one batch through the prepared
graph, record what each activation observer sees, and pair it by value with the ONNX tensors
(``calibration.transfer``). A paired observer gets the plan's range for that tensor; an unpaired
one (a value only this graph has) keeps what it observed itself. Weight observers are left as
they are: PT2E's per-channel symmetric min-max is the plan's weight rule (absmax / 127).

Imports torch / torchao lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.backends.tflite.quantizer import CONVS, is_call


@dataclass
class Pairing:
    """Activation observer module name -> ONNX tensor, plus those left to their own observation."""

    pairs: dict[str, str] = field(default_factory=dict)
    own: list[str] = field(default_factory=list)
    max_error: float = 0.0


def activation_observers(graph: Any) -> dict[str, Any]:
    """Observer modules of ``graph`` (a prepared PT2E module) that watch activations."""
    from torchao.quantization.pt2e.observer import ObserverBase

    out = {}
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        mod = graph.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if isinstance(mod, ObserverBase) and getattr(src, "op", None) != "get_attr":
            out[str(node.target)] = mod
    return out


def module_inputs(root: Any, modules: dict[str, Any], x: np.ndarray) -> dict[str, np.ndarray]:
    """The first tensor each of ``modules`` (name -> submodule of ``root``) receives when ``root``
    runs once on ``x`` (fp32 numpy copies; a module that never runs is left out)."""
    import torch

    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in modules.items():
        def hook(_m: Any, args: tuple, name: str = name) -> None:
            if name not in seen and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().float().numpy().copy()
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            root(torch.from_numpy(np.array(x, np.float32)))
    finally:
        for h in hooks:
            h.remove()
    return seen


def pair(graph: Any, batch: np.ndarray, onnx_values: dict[str, np.ndarray]) -> Pairing:
    """Pair the activation observers of ``graph`` with ONNX tensors by the values they see on ``batch``.

    Args:
        graph: prepared PT2E module (observers in place; one forward on ``batch`` is harmless
            once they have seen the fit samples, which include it).
        batch: one batch in the module's input layout.
        onnx_values: ``calibration.transfer.onnx_activations`` on the same samples.
    """
    from calibration.transfer import match_tensors

    observers = activation_observers(graph)
    seen = module_inputs(graph, observers, batch)
    match = match_tensors({**seen, "": np.asarray(batch, np.float32)}, onnx_values)
    pairs = dict(match.pairs)
    model_input = pairs.pop("", None)
    # zero padding that ONNX folded into its Conv (and other data movement) has no ONNX twin: it
    # takes the range of the tensor it moves, as the plan's SHARE_INPUT_PARAMS rule does
    for node in graph.graph.nodes:
        if node.op != "call_module" or str(node.target) not in observers or str(node.target) in pairs:
            continue
        src = node.args[0] if node.args else None
        while is_call(src, _MOVES_DATA) and src.args:
            src = src.args[0]
        if getattr(src, "op", None) == "call_module" and str(src.target) in pairs:
            pairs[str(node.target)] = pairs[str(src.target)]
        elif getattr(src, "op", None) == "placeholder" and model_input is not None:
            pairs[str(node.target)] = model_input
    return Pairing(pairs, sorted(set(observers) - set(pairs)), max(match.errors.values(), default=0.0))


#: aten ops whose output values are a subset of their input's (plus padding zeros)
_MOVES_DATA = ("pad", "constant_pad_nd", "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute",
               "max_pool2d", "max_pool2d_with_indices", "clone", "contiguous")


def apply(graph: Any, pairing: Pairing, ranges: dict[str, tuple[float, float]]) -> int:
    """Set the paired min-max observers to the plan's ranges; returns how many were set.

    Only min-max observers hold a plain range; a histogram observer (option ``observer:
    histogram``) searches its own clipping and is left alone.
    """
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver

    done = 0
    for name, tensor in pairing.pairs.items():
        mod = graph.get_submodule(name)
        if tensor not in ranges or not isinstance(mod, MinMaxObserver):
            continue
        lo, hi = ranges[tensor]
        mod.min_val = torch.tensor(float(lo), dtype=mod.min_val.dtype)
        mod.max_val = torch.tensor(float(hi), dtype=mod.max_val.dtype)
        done += 1
    return done


def correct_biases(graph: Any, batch: np.ndarray, onnx_values: dict[str, np.ndarray], onnx_model: Any,
                   corrected: dict[str, np.ndarray]) -> int:
    """Add the plan's bias correction to the conv / linear biases of a prepared PT2E graph.

    ``corrected`` maps ONNX bias initializers to their corrected values (``QuantPlan.bias``). Each
    FX conv / linear whose weight is quantized (it feeds through an observer) is paired by its
    output values with an ONNX Conv / Gemm output; its bias then moves by the same amount as that
    node's bias (corrected - original). Call before the observers see the fit samples.

    Returns:
        How many biases were corrected.
    """
    import torch
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    onnx_delta: dict[str, np.ndarray] = {}
    for n in onnx_model.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in corrected and n.output[0] in onnx_values:
            onnx_delta[n.output[0]] = corrected[n.input[2]] - numpy_helper.to_array(inits[n.input[2]])
    targets = {}
    for node in graph.graph.nodes:
        if not is_call(node, CONVS + ("linear",)) or len(node.args) < 3:
            continue
        if getattr(node.args[1], "op", None) != "call_module":  # weight not observed: kept float
            continue
        src = node.args[2]
        while getattr(src, "op", None) == "call_module" and src.args:
            src = src.args[0]
        if getattr(src, "op", None) == "get_attr":
            targets[node.name] = str(src.target)
    if not targets or not onnx_delta:
        return 0
    seen: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.name in targets and isinstance(out, torch.Tensor):
                seen[n.name] = out.detach().float().numpy().copy()
            return out

    with torch.no_grad():
        Recorder(graph).run(torch.from_numpy(np.array(batch, np.float32)))
    from calibration.transfer import match_tensors

    match = match_tensors(seen, {k: onnx_values[k] for k in onnx_delta})
    done = 0
    for name, tensor in match.pairs.items():
        bias = functools.reduce(getattr, targets[name].split("."), graph)  # param, buffer or constant
        delta = torch.from_numpy(onnx_delta[tensor].astype(np.float32))
        if tuple(bias.shape) != tuple(delta.shape):
            continue
        with torch.no_grad():
            bias.add_(delta)
        done += 1
    return done

