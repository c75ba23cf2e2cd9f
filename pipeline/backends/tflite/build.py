"""litert-torch conversions: fp32, fp16 weights, full-integer INT8 (PT2E, real calibration samples).

Heavy imports (torch, litert_torch, torchao, ai_edge_quantizer) happen inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from calibration.search import Arrays, Holdout, Ranking, first

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext

# Ops whose weights ai-edge-quantizer's float_casting can store as fp16 (DEQUANTIZE in front).
INT8_FILE = "model.tflite"
_FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")


@dataclass
class Prepared:
    """The PyTorch module as it will be converted, and the sample it is traced with."""

    module: Any
    sample: Any
    """torch.Tensor of the first input in the model's layout, batch = the spec's static batch."""
    args: tuple[Any, ...]
    """One such tensor per input, in forward()'s order (``sample`` first): what the model is traced with."""
    batch: int
    data_layout: str
    model_layout: str
    notes: dict[str, Any] = field(default_factory=dict)


def prepare(ctx: "BuildContext") -> Prepared:
    """Load the eval-mode module; wrap it for channels-last I/O if ``channels_last_io`` is set.

    The samples the agent hands in keep the spec's layout (``ctx.spec.input.layout``); if the
    model's input layout differs the runner transposes, and runner_config records both.
    """
    import torch

    module = ctx.torch_model().eval()
    batch = int(ctx.spec.input.shape[0])
    data_layout = ctx.spec.input.layout
    xs = [np.ascontiguousarray(ctx.calibration.x[n][:batch], dtype=np.float32) for n in ctx.input_names]
    if len(ctx.calibration) < batch:
        raise ValueError(f"need at least {batch} calibration samples to trace the model, got {len(ctx.calibration)}")
    model_layout = data_layout
    if ctx.build.options.get("channels_last_io") and data_layout == "NCHW":
        import litert_torch

        if len(xs) != 1:
            raise ValueError("channels_last_io takes a model with one input")
        # NHWC input avoids the leading TRANSPOSE litert-torch otherwise inserts for NCHW models
        module = litert_torch.to_channel_last_io(module, args=[0])
        xs[0] = xs[0].transpose(0, 2, 3, 1).copy()
        model_layout = "NHWC"
    args = tuple(torch.from_numpy(x) for x in xs)
    return Prepared(module, args[0], args, batch, data_layout, model_layout)


def to_model_layout(p: Prepared, x: np.ndarray) -> np.ndarray:
    """Samples in the data layout -> the layout the converted module takes."""
    if p.data_layout == p.model_layout:
        return x
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def convert_fp32(p: Prepared) -> bytes:
    """Plain float32 conversion."""
    import litert_torch

    return bytes(litert_torch.convert(p.module, p.args).model_content())


def cast_weights_fp16(fp32_model: bytes) -> tuple[bytes, dict[str, Any]]:
    """Store the weights of conv / fully-connected ops as fp16 (activations stay float32).

    Uses ai-edge-quantizer's ``float_casting`` (TFLite's "float16 quantization"): half the size,
    and XNNPACK may run the graph in fp16 where the CPU supports it.
    """
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qz = quantizer.Quantizer(bytearray(fp32_model))
    for op in _FP16_WEIGHT_OPS:
        qz.add_weight_only_config(".*", getattr(qtyping.TFLOperationName, op), 16,
                                  algorithm_key=AlgorithmName.FLOAT_CASTING)
    result = qz.quantize(enable_progress_report=False)
    return bytes(result.quantized_model), {"method": "ai_edge_quantizer float_casting", "ops": list(_FP16_WEIGHT_OPS)}


#: samples per run of a PT2E graph exported with a dynamic batch (calibration, holdout scoring)
RUN_BATCH = 32


def export_for_search(p: Prepared, x: np.ndarray) -> tuple[Any, int | None]:
    """The module exported for PT2E, and the batch its graphs run with (None: any batch).

    The search runs every candidate over the whole holdout, so the graph is exported with a
    dynamic batch (traced on two samples: a batch of one would be specialised) and run
    up to ``RUN_BATCH`` samples at a time, ~10x faster than one by one; litert-torch re-exports the
    final graph on the static sample. A model whose code fixes the batch keeps the static export
    and runs at the spec's batch.
    """
    import torch

    if x.shape[0] >= 2:
        try:
            dim = torch.export.Dim("batch", min=1, max=1 << 16)
            two = torch.from_numpy(np.ascontiguousarray(x[:2], dtype=np.float32))
            return torch.export.export(p.module, (two,), dynamic_shapes=({0: dim},)).module(), None
        except Exception:  # noqa: BLE001 - torch.export raises many types; the static export decides
            pass
    return torch.export.export(p.module, (p.sample,)).module(), p.batch


def _whole_batches(x: np.ndarray, batch: int) -> np.ndarray:
    """The first multiple of ``batch`` samples (the exported graph has a static batch)."""
    return x[:(x.shape[0] // batch) * batch]


def _run(module: Any, x: np.ndarray, batch: int | None, names: Sequence[str]) -> Arrays:
    """Every output of ``module`` on ``x`` in static batches (checks.run_batched_all), by the
    model's output ``names`` in the order the exporter flattens them: what the INT8 search
    scores, so a metric reading any output (a detector's boxes) sees it. ``batch`` None: the
    graph takes any batch, so ``x`` is split evenly in chunks of at most ``RUN_BATCH`` (34
    samples run as 17 + 17, not as 32 + 32 with 30 padding copies)."""
    import torch

    from pipeline.backends.checks import run_batched_all
    from pipeline.stages.export import flatten_outputs

    def every(feeds: Arrays) -> Arrays:
        flat = flatten_outputs(module(torch.from_numpy(np.array(feeds["x"]))))[0]
        if len(flat) != len(names):
            raise ValueError(f"the module returns {len(flat)} outputs; the model's outputs are {list(names)}")
        return {n: t.numpy() for n, t in zip(names, flat)}

    if batch is None:
        chunks = max(1, math.ceil(x.shape[0] / RUN_BATCH))
        batch = max(1, math.ceil(x.shape[0] / chunks))
    with torch.no_grad():  # np.array: a writable copy (the samples may be memory-mapped)
        return run_batched_all(every, {"x": x}, batch)


@dataclass
class Pt2eCandidate:
    """A converted PT2E fake-quant graph: the arithmetic the TFLite int8 model runs."""

    method: str
    float_layers: tuple[str, ...]
    graph: Any
    quantizer: Any
    applied: int
    prepared: Prepared
    facts: dict[str, Any]
    scorer: Any = None
    """``graph`` with fused fake-quant ops (fakequant.py): the same numbers, a forward ~2.4x faster (EfficientNet-Lite0)."""

    def run(self, x: Arrays) -> Arrays:
        if self.scorer is None:
            from pipeline.backends.tflite.fakequant import fuse_fake_quant

            self.scorer = fuse_fake_quant(self.graph)[0]
        return _run(self.scorer, to_model_layout(self.prepared, first(x)), self.facts["batch"], self.facts["outputs"])

    def tflite(self) -> bytes:
        """The full-integer .tflite model (litert-torch with the candidate's quantizer)."""
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        model = litert_torch.convert(self.graph, (self.prepared.sample,),
                                     quant_config=QuantConfig(pt2e_quantizer=self.quantizer))
        return bytes(model.model_content())

    def write(self, workdir: Path) -> list[str]:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / INT8_FILE).write_bytes(self.tflite())
        return [INT8_FILE]

    def notes(self) -> dict[str, Any]:
        f = self.facts
        kept = list(self.quantizer.kept_float)
        return {"format": "TFLite full integer (litert-torch PT2E)", "quantizer": f["quantizer"],
                "shared_ranges": {**f["pairing"], "from_plan": self.applied}, "weights": f["weights"],
                "fused_conv_relu6": int(self.quantizer.fused_relu6), "int8_add_mul": int(self.quantizer.int8_binary),
                "pads_folded_into_conv": f["pads_folded"],
                "kept_float": kept, "bias_correction": f["bias_correction"],
                # a float layer reads a float tensor, so the conv / linear producing it stays float too
                "float_producers": sorted(set(kept) - set(f["user_float"]) - set(self.float_layers))}


class Pt2eBuilder:
    """PT2E candidates: one exported graph, calibrated once per float-layer set (observers see
    every fit sample), each method's plan ranges applied to a copy of the calibrated graph."""

    def __init__(self, p: Prepared, ctx: "BuildContext", fit: Any, plans: dict[str, Any], observer: str) -> None:
        from calibration.graph import load_model
        from calibration.transfer import onnx_activations

        from pipeline.backends.tflite.quantizer import fold_zero_pads

        self.p, self.ctx, self.fit, self.plans, self.observer = p, ctx, fit, plans, observer
        self.per_channel = bool(ctx.spec.calibration.per_channel)
        self.user_float = [str(n) for n in ctx.build.options.get("float_layers") or ()]
        self.fit_x = _whole_batches(to_model_layout(p, fit.samples), p.batch)
        self.exported, self.batch = export_for_search(p, self.fit_x)
        self.pads_folded = fold_zero_pads(self.exported)
        self.onnx_values = (onnx_activations(ctx.onnx_fp32, fit.samples[:p.batch], threads=ctx.target.threads)
                            if plans else {})
        # bias correction barely depends on the method (only via the int32-bias floor): the first plan's
        self.corrected = next(iter(plans.values())).bias if plans else {}
        self.onnx_model = load_model(ctx.onnx_fp32) if self.corrected else None
        self.calibrated: dict[tuple[str, ...], tuple[Any, Any, Any, int]] = {}

    def _calibrated(self, float_layers: tuple[str, ...]) -> tuple[Any, Any, Any, int]:
        """(quantizer, calibrated graph, pairing, corrected biases) for one float-layer set."""
        import copy

        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        from pipeline.backends.tflite import ranges as shared
        from pipeline.backends.tflite.quantizer import make_quantizer

        if float_layers not in self.calibrated:
            quantizer = make_quantizer(self.per_channel, self.observer, list(float_layers))
            graph = prepare_pt2e(copy.deepcopy(self.exported), quantizer)
            missing = sorted(set(float_layers) - set(quantizer.kept_float))
            if missing:  # checked before the (long) calibration pass
                raise ValueError(f"float_layers {missing} match no conv / linear module of the model")
            # pairing and bias correction both compare values with the *uncorrected* fp32 ONNX model
            batch = self.fit_x[:self.p.batch]
            pairing = shared.pair(graph, batch, self.onnx_values) if self.plans else shared.Pairing()
            n = shared.correct_biases(graph, batch, self.onnx_values, self.onnx_model, self.corrected) \
                if self.corrected else 0
            if self._needs_fit_pass(graph, pairing):
                _run(graph, self.fit_x, self.batch, self.ctx.output_names)  # the observers see every fit sample
            self.calibrated[float_layers] = (quantizer, graph, pairing, n)
        return self.calibrated[float_layers]

    def _needs_fit_pass(self, graph: Any, pairing: Any) -> bool:
        """Whether any observer keeps its own range: when every one is a min-max observer paired
        with a tensor each plan has, the plan's ranges replace what it would observe (ranges.apply),
        so the pass would be wasted."""
        from torchao.quantization.pt2e.observer import MinMaxObserver

        if not self.plans or pairing.own:
            return True
        return any(not isinstance(graph.get_submodule(name), MinMaxObserver)
                   or any(t not in plan.ranges for plan in self.plans.values()) for name, t in pairing.pairs.items())

    def candidate(self, method: str, float_layers: Sequence[str]) -> Pt2eCandidate:
        import copy

        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        from pipeline.backends.tflite import ranges as shared

        quantizer, graph, pairing, n_corrected = self._calibrated(tuple(self.user_float) + tuple(float_layers))
        graph = copy.deepcopy(graph)
        applied = shared.apply(graph, pairing, self.plans[method].ranges) if method in self.plans else 0
        facts = {"outputs": self.ctx.output_names, "batch": self.batch, "user_float": self.user_float, "pads_folded": self.pads_folded,
                 "quantizer": "litert_torch PT2E (symmetric int8 weights, int8 activations, static)",
                 "weights": "per-channel" if self.per_channel else "per-tensor",
                 "pairing": {"observers": len(pairing.pairs) + len(pairing.own), "observed_by_pt2e": pairing.own,
                             "max_match_error": pairing.max_error},
                 "bias_correction": {"applied": n_corrected > 0, "layers": n_corrected,
                                     "onnx_biases_corrected": len(self.corrected),
                                     "source": "calibration plan (as quantize_onnx for ONNX Runtime), paired by value"}}
        return Pt2eCandidate(method, tuple(float_layers), convert_pt2e(graph, fold_quantize=False), quantizer,
                             applied, self.p, facts)

    def rank(self, method: str, holdout: Holdout, reference: Arrays) -> Ranking:
        """Gated ONNX ranking under the same plan, paired with the modules (sensitivity.py)."""
        from pipeline.backends.tflite.sensitivity import rank_modules

        ctx = self.ctx
        ranked = rank_modules(ctx.torch_model().eval(), self.fit.samples, first(holdout.x), self.per_channel,
                              ctx.onnx_fp32, self.plans.get(method), self.onnx_values, ctx.target.threads)
        return Ranking([s for s in ranked if s.name not in self.user_float])


def convert_int8(p: Prepared, ctx: "BuildContext") -> tuple[bytes, dict[str, Any]]:
    """Full-integer INT8 from edgeship's one calibration (PT2E graph, litert-torch converter).

    * Weights: symmetric int8, per output channel unless the spec says ``per_channel: false``.
    * Activations: int8 per tensor. The observers see the calibration fit split; every observer
      whose tensor pairs with an ONNX tensor (ranges.py) then takes the shared calibration plan's
      range (asymmetric, as TFLite's int8 activations are). ``ort-default`` (or option
      ``observer: histogram``) keeps the graph's own observers. Conv + ReLU6 is fused, and ADD /
      MUL of two activations (residual adds) run in int8 (see quantizer.py).
    * Method choice, fallback, budget and report: ``calibration.search`` over
      :class:`Pt2eBuilder`, each candidate scored with its PT2E fake-quant graph on the
      calibration holdout against the fp32 module. Modules named in ``options["float_layers"]``
      always stay float.
    """
    from pipeline.backends.calibrate import calibration_plans, run_search, spec_methods, split
    from pipeline.backends.checks import fp32_reference

    t0 = time.perf_counter()
    observer = str(ctx.build.options.get("observer", "minmax"))
    own = (f"{observer} (the graph's own observers)",)
    methods = own if observer != "minmax" else spec_methods(ctx, ort_default=own)
    plans = calibration_plans(ctx, tuple(m for m in methods if m not in own), "asymmetric")[0]
    fit, hold = split(ctx)
    hold_x = _whole_batches(hold.samples, p.batch)
    if _whole_batches(fit.samples, p.batch).shape[0] == 0 or hold_x.shape[0] == 0:
        raise ValueError(f"calibration fit ({len(fit)}) and holdout ({len(hold)}) splits each need at least "
                         f"one batch of {p.batch} samples; add calibration samples")
    builder = Pt2eBuilder(p, ctx, fit, plans, observer)
    labels = None if hold.labels is None else hold.labels[:hold_x.shape[0]]
    # fp32 reference: the ONNX model through ONNX Runtime, the reference the conversion check
    # measures the written model against too (PyTorch's eager fp32 forward matches it to ~1e-6
    # but took 14 s of a 60 s EfficientNet-Lite0 search; ONNX Runtime takes ~2 s)
    reference = fp32_reference(ctx, {ctx.input_name: hold_x})
    found = run_search(ctx, builder, Holdout({ctx.input_name: hold_x}, labels), reference, methods,
                       int(builder.fit_x.shape[0]), t0)
    files = found.candidate.write(ctx.workdir)
    found.report.notes = found.candidate.notes()
    return (ctx.workdir / files[0]).read_bytes(), found.report.to_dict()
