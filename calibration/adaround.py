"""AdaRound: weight rounding learned on the calibration set (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Round-to-nearest minimises each weight's own error, not the layer's output error: with the
plan's per-channel scale ``s`` fixed, every weight may still round up or down. Per Conv / Gemm
we learn that choice by minimising ``||W x - s q x||^2`` over the layer's fp32 inputs ``x`` on the
calibration data, with the paper's relaxation: ``q = floor(w / s) + h(V)``, ``h`` a rectified
sigmoid, and a regulariser ``1 - |2h - 1|^beta`` (beta annealed 20 -> 2) that drives ``h`` to 0
or 1 before it is hardened.

The result is plain float weights equal to ``s * q`` (float32), so every backend's own
round-to-nearest with the same scale gives back ``q``: ONNX Runtime's QDQ writer (our scales),
ncnn's and PT2E's ``absmax / 127`` per channel. That is why each channel's largest weight keeps
its nearest rounding and no ``|q|`` may exceed it: ``absmax``, hence every backend's scale, stays
what it was.

Cost is bounded: inputs are im2col rows at a few thousand sampled output positions per layer,
and a fixed number of Adam steps on mini-batches of them. A layer with fewer rows than weights
per output channel (a Gemm on a few hundred samples) would be fitted to noise and keeps nearest
rounding; so does any layer whose learned rounding is not better than nearest on all its rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import CalibrationSet
from calibration.graph import WeightedLayer, initializer_array
from calibration.observers import QParams

ADAROUND_FORMAT = "edgeship-adaround-v1"
#: the rectified sigmoid's stretch (paper: zeta = 1.1, gamma = -0.1)
ZETA, GAMMA = 1.1, -0.1
INT8_MAX = 127


@dataclass(frozen=True)
class AdaRoundOptions:
    """The optimisation budget.

    Attributes:
        iterations: Adam steps per layer.
        rows: im2col rows (output positions x samples) collected per layer.
        samples: most calibration samples run to collect them.
        batch: rows per step.
        reg: weight of the rounding regulariser (the reconstruction term is normalised by
            nearest rounding's error, so this is scale free). On random convs with correlated
            inputs 10 reached 0.29x nearest's error in 500 steps where 3 reached 0.34x and 1
            0.89x (weaker weights leave ``h`` fractional when it is hardened).
        beta: regulariser exponent, annealed linearly from the first to the second value.
        warmup: share of the steps without the regulariser.
        lr: Adam's learning rate on V.
        seed: sampling and mini-batch seed (a seeded run is deterministic).
    """

    iterations: int = 500
    rows: int = 4096
    samples: int = 256
    batch: int = 256
    reg: float = 10.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr: float = 0.03
    seed: int = 0


@dataclass
class LayerRounding:
    """What AdaRound did to one layer.

    Attributes:
        node, weight: the layer and its weight initializer.
        nearest_mse, adaround_mse: output error of round-to-nearest and of the learned rounding
            on the layer's collected rows (mean square over rows and output channels).
        flipped: weights rounded the other way than nearest.
        kept: why nearest rounding was kept ("" when the learned rounding was taken).
    """

    node: str
    weight: str
    nearest_mse: float
    adaround_mse: float
    flipped: int
    kept: str = ""


@dataclass
class AdaRoundResult:
    """Learned weights: initializer name -> float32 ``s * q`` (only layers whose rounding changed)."""

    rounded: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[LayerRounding] = field(default_factory=list)
    seconds: float = 0.0
    cache_hit: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for a report."""
        took = [r for r in self.layers if not r.kept]
        ratio = [r.adaround_mse / r.nearest_mse for r in took if r.nearest_mse > 0]
        return {"layers": len(self.layers), "rounded": len(took),
                "kept_nearest": {r.node: r.kept for r in self.layers if r.kept},
                "mean_error_ratio": round(float(np.mean(ratio)), 4) if ratio else None,
                "flipped": int(sum(r.flipped for r in took)), "seconds": round(self.seconds, 3),
                "cache_hit": self.cache_hit}


def supported(model: Any, layer: WeightedLayer) -> bool:
    """Conv 2-D (any group, explicit pads) and Gemm (A not transposed): the layers AdaRound learns."""
    from onnx import helper

    node = next(n for n in model.graph.node if n.name == layer.node)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = initializer_array(model, layer.weight)
    if layer.op == "Conv":
        pad = attrs.get("auto_pad", b"NOTSET")
        return w.ndim == 4 and pad in (b"NOTSET", "NOTSET", b"VALID", "VALID")
    return layer.op == "Gemm" and not int(attrs.get("transA", 0)) and w.ndim == 2


def as_rows(w: np.ndarray, layer: WeightedLayer, groups: int) -> np.ndarray:
    """Weights as (groups, out channels per group, inputs per output): im2col's layout."""
    if layer.op == "Gemm":
        w2 = w if layer.axis == 0 else w.T
        return w2[None]
    m = w.shape[0]
    return w.reshape(groups, m // groups, -1)


def from_rows(rows: np.ndarray, w: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """Inverse of :func:`as_rows`."""
    if layer.op == "Gemm":
        return rows[0] if layer.axis == 0 else rows[0].T
    return rows.reshape(w.shape)


def _conv_attrs(node: Any, kernel: tuple[int, int]) -> dict[str, Any]:
    from onnx import helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return {"group": int(a.get("group", 1)), "strides": list(a.get("strides", [1, 1])),
            "dilations": list(a.get("dilations", [1, 1])), "pads": list(a.get("pads", [0, 0, 0, 0])),
            "kernel": kernel}


def conv_rows(x: np.ndarray, attrs: dict[str, Any], count: int, rng: np.random.Generator) -> np.ndarray:
    """im2col rows of ``x`` (N, C, H, W) at ``count`` random output positions per sample.

    Returns:
        (N * count, groups, C / groups * kh * kw) float32, matching :func:`as_rows`.
    """
    n, c, _, _ = x.shape
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel"], attrs["strides"], attrs["dilations"]
    t, l, b, r = attrs["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    k = min(count, oh * ow)
    pos = np.stack([rng.choice(oh * ow, k, replace=False) for _ in range(n)])  # (n, k)
    ni = np.repeat(np.arange(n), k)
    pi, pj = (pos // ow).reshape(-1), (pos % ow).reshape(-1)
    hi = pi[:, None] * sh + np.arange(kh)[None] * dh  # (P, kh)
    wi = pj[:, None] * sw + np.arange(kw)[None] * dw  # (P, kw)
    patches = xp[ni[:, None, None], :, hi[:, :, None], wi[:, None, :]]  # (P, kh, kw, C)
    patches = patches.transpose(0, 3, 1, 2)  # (P, C, kh, kw): the weight's (C, kh, kw) order
    g = attrs["group"]
    return np.ascontiguousarray(patches.reshape(len(ni), g, (c // g) * kh * kw), np.float32)


def collect_rows(model: Any, layers: list[WeightedLayer], calib: CalibrationSet, opts: AdaRoundOptions,
                 batch_size: int = 16, threads: int | None = None) -> dict[str, np.ndarray]:
    """Each layer's fp32 input rows on up to ``opts.samples`` calibration samples (one model run)."""
    from calibration.graph import model_with_outputs
    from calibration.runtime import make_session, run_batches

    rng = np.random.default_rng(opts.seed)
    n = min(len(calib), opts.samples)
    picked = np.sort(rng.choice(len(calib), n, replace=False))
    nodes = {nd.name: nd for nd in model.graph.node}
    names = list(dict.fromkeys(layer.inputs[0] for layer in layers))
    session = make_session(model_with_outputs(model, names).SerializeToString(), threads=threads)
    per_sample = -(-opts.rows // n)
    # each conv's attributes once, not per batch (initializer_array decodes the weight)
    conv_attrs = {layer.node: _conv_attrs(nodes[layer.node], initializer_array(model, layer.weight).shape[2:4])
                  for layer in layers if layer.op != "Gemm"}
    parts: dict[str, list[np.ndarray]] = {layer.node: [] for layer in layers}
    for _, outs in run_batches(session, calib.samples[picked], batch_size, names):
        values = dict(zip(names, outs))
        for layer in layers:
            x = values[layer.inputs[0]]
            if layer.op == "Gemm":
                parts[layer.node].append(x.reshape(x.shape[0], 1, -1).astype(np.float32))
            else:
                parts[layer.node].append(conv_rows(x, conv_attrs[layer.node], per_sample, rng))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _channel_limits(w_rows: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the nearest-rounded int of each row's extreme weight, a mask of that weight): the extreme
    keeps its rounding and bounds every |q|, so each channel's absmax (every backend's scale) holds."""
    a = np.abs(w_rows)
    amax = a.max(axis=-1, keepdims=True)
    qext = np.minimum(np.round(amax / s), INT8_MAX)
    first = (a == amax) & (np.cumsum(a == amax, axis=-1) == 1)
    return qext, first


def learn_rounding(w_rows: np.ndarray, s: np.ndarray, x: np.ndarray, opts: AdaRoundOptions) -> np.ndarray:
    """Learned integer weights for one layer.

    Args:
        w_rows: fp32 weights (groups, out per group, inputs per output).
        s: per output channel scale, broadcastable to ``w_rows`` (groups, out per group, 1).
        x: input rows (P, groups, inputs per output).
        opts: the budget.

    Returns:
        q, integers as float64 in ``w_rows``' shape, ``|q|`` within each channel's extreme.
    """
    import torch

    threads = torch.get_num_threads()
    # one thread: the steps are small, and on a shared 2-core machine two threads ran 8x slower
    torch.set_num_threads(1)
    try:
        return _learn(torch, w_rows, s, x, opts)
    finally:
        torch.set_num_threads(threads)


def _learn(torch: Any, w_rows: np.ndarray, s: np.ndarray, x: np.ndarray, opts: AdaRoundOptions) -> np.ndarray:
    gen = torch.Generator().manual_seed(opts.seed)
    w = torch.from_numpy(w_rows.astype(np.float32))
    st = torch.from_numpy(s.astype(np.float32))
    xt = torch.from_numpy(x)
    qext, first = _channel_limits(w_rows, s)
    lim = torch.from_numpy(qext.astype(np.float32))
    nearest = torch.clamp(torch.round(w / st), -lim, lim)
    fixed = torch.from_numpy(first)
    floor = torch.floor(w / st)
    rest = (w / st - floor).clamp(0.0, 1.0)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).clone().requires_grad_(True)
    target = torch.einsum("pgk,gmk->pgm", xt, w)

    def output_err(q: torch.Tensor, rows: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("pgk,gmk->pgm", rows, st * q) - want).pow(2).mean()

    with torch.no_grad():
        base = float(output_err(nearest, xt, target))
    if base <= 0.0:
        return nearest.double().numpy()
    optim = torch.optim.Adam([v], lr=opts.lr)
    warm = int(opts.warmup * opts.iterations)
    for it in range(opts.iterations):
        idx = torch.randint(0, xt.shape[0], (min(opts.batch, xt.shape[0]),), generator=gen)
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        q = torch.where(fixed, nearest, torch.clamp(floor + h, -lim, lim))
        loss = output_err(q, xt[idx], target[idx]) / base
        if it >= warm:
            frac = (it - warm) / max(1, opts.iterations - warm)
            beta = opts.beta[0] + (opts.beta[1] - opts.beta[0]) * frac
            loss = loss + opts.reg * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        q = torch.where(fixed, nearest, torch.clamp(floor + (v >= 0).float(), -lim, lim))
    return q.double().numpy()


def output_mse(w_rows: np.ndarray, q: np.ndarray, s: np.ndarray, x: np.ndarray) -> float:
    """Mean square of ``(s q - w) x`` over the rows and output channels."""
    dw = (s * q - w_rows).astype(np.float64)
    return float(np.mean(np.einsum("pgk,gmk->pgm", x.astype(np.float64), dw) ** 2))


def on_grid(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float32 ``s * q``: what each backend rounds back to ``q`` with the scale ``s``."""
    return (s.astype(np.float32) * q.astype(np.float32)).astype(np.float32)


def _row_scale(q: QParams, rows_shape: tuple[int, ...]) -> np.ndarray:
    """The plan's weight scale in :func:`as_rows`' layout (groups, out per group, 1)."""
    s = np.asarray(q.scale, np.float32)
    return np.broadcast_to(s.reshape(-1, 1) if s.ndim else s, (rows_shape[0] * rows_shape[1], 1)).reshape(
        rows_shape[0], rows_shape[1], 1)


def _layer_key(base: str, weight: str, scale: np.ndarray) -> str:
    blob = json.dumps({"base": base, "weight": weight, "scale": hashlib.sha256(scale.tobytes()).hexdigest()})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_layer(path: Path) -> tuple[np.ndarray, LayerRounding]:
    with np.load(path, allow_pickle=False) as z:
        return z["q"].astype(np.float64), LayerRounding(**json.loads(str(z["facts"])))


def _save_layer(path: Path, q: np.ndarray, facts: LayerRounding) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, q=q.astype(np.int8), facts=np.array(json.dumps(asdict(facts))))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def round_layer(w_rows: np.ndarray, s: np.ndarray, x: np.ndarray | None, layer: WeightedLayer,
                opts: AdaRoundOptions) -> tuple[np.ndarray, LayerRounding]:
    """Learned q of one layer, or nearest rounding where AdaRound cannot or does not pay."""
    qext, _ = _channel_limits(w_rows, s)
    nearest = np.clip(np.round(w_rows / s), -qext, qext)
    if x is None or x.shape[0] < w_rows.shape[-1]:
        n = 0 if x is None else x.shape[0]
        return nearest, LayerRounding(layer.node, layer.weight, 0.0, 0.0, 0,
                                      f"{n} input rows for {w_rows.shape[-1]} weights per output")
    q = learn_rounding(w_rows, s, x, opts)
    near, ada = output_mse(w_rows, nearest, s, x), output_mse(w_rows, q, s, x)
    facts = LayerRounding(layer.node, layer.weight, near, ada, int((q != nearest).sum()))
    if not ada < near:  # the guard: never worse than nearest on the layer's own rows
        facts.kept, q = "no lower output error than nearest rounding", nearest
    return q, facts


def adaround(model: Any, layers: list[WeightedLayer], weights: dict[str, QParams], calib: CalibrationSet,
             opts: AdaRoundOptions | None = None, cache_dir: Path | None = None, model_sha: str = "",
             batch_size: int = 16, threads: int | None = None) -> AdaRoundResult:
    """Learn the rounding of every supported layer with the plan's weight scales.

    Args:
        model: the fp32 onnx.ModelProto (node names set).
        layers: its weighted layers; Conv 2-D and Gemm are learned, the rest left alone.
        weights: the plan's weight parameters (``QuantPlan.weights``).
        calib: the samples whose layer inputs are reconstructed (the fit split, never the holdout).
        opts: the budget.
        cache_dir: per-layer results cached by model, data, options, weight and scale (None: no cache).
        model_sha: the model's sha256 (part of the cache key).
        batch_size, threads: the collection run's onnxruntime settings.

    Returns:
        The learned float weights of the layers whose rounding changed, and per-layer facts.
    """
    from onnx import helper

    opts = opts or AdaRoundOptions()
    t0 = time.perf_counter()
    base = json.dumps({"f": ADAROUND_FORMAT, "m": model_sha, "c": calib.content_hash, "o": asdict(opts)},
                      sort_keys=True)
    nodes = {n.name: n for n in model.graph.node}
    todo = [la for la in layers if la.weight in weights and supported(model, la)]
    result = AdaRoundResult()
    found: dict[str, tuple[np.ndarray, LayerRounding]] = {}
    paths: dict[str, Path | None] = {}
    for layer in todo:
        key = _layer_key(base, layer.weight, np.asarray(weights[layer.weight].scale, np.float32))
        paths[layer.node] = Path(cache_dir) / f"adaround-{key}.npz" if cache_dir is not None else None
        if paths[layer.node] is not None and paths[layer.node].exists():  # type: ignore[union-attr]
            found[layer.node] = _load_layer(paths[layer.node])  # type: ignore[arg-type]
    missing = [la for la in todo if la.node not in found]
    rows = collect_rows(model, missing, calib, opts, batch_size, threads) if missing else {}
    for layer in todo:
        w = initializer_array(model, layer.weight).astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[layer.node].attribute}
        w_rows = as_rows(w, layer, int(attrs.get("group", 1)) if layer.op == "Conv" else 1)
        s = _row_scale(weights[layer.weight], w_rows.shape)
        if layer.node not in found:
            found[layer.node] = round_layer(w_rows, s, rows.pop(layer.node, None), layer, opts)
            if paths[layer.node] is not None:
                _save_layer(paths[layer.node], *found[layer.node])  # type: ignore[arg-type]
        q, facts = found[layer.node]
        result.layers.append(facts)
        if not facts.kept:
            result.rounded[layer.weight] = from_rows(on_grid(q, s), w, layer)
    result.cache_hit = not missing
    result.seconds = time.perf_counter() - t0
    return result


def learn_plan_rounding(model: Any, plan: Any, stats: Any, calib: CalibrationSet, correct_bias: bool,
                        cache_dir: Path | None = None, batch_size: int = 16, threads: int | None = None,
                        opts: AdaRoundOptions | None = None) -> AdaRoundResult:
    """Give ``plan`` (a :class:`calibration.plan.QuantPlan`, changed in place) AdaRound's weights
    and, with ``correct_bias``, the bias correction of what the learned rounding still shifts.

    Args:
        model: the fp32 model the plan was made for.
        plan: its plan; ``plan.rounded`` and ``plan.bias`` are replaced.
        stats: the plan's statistics (channel means for bias correction, model sha for the cache).
        calib: the fit samples the statistics came from.
        correct_bias, cache_dir, batch_size, threads, opts: as for :func:`adaround`.
    """
    from calibration.plan import bias_correction

    result = adaround(model, plan.layers, plan.weights, calib, opts, cache_dir, stats.model_sha256, batch_size,
                      threads)
    plan.rounded = result.rounded
    if correct_bias:
        plan.bias = bias_correction(model, plan, stats)
    return result
