"""QDQ ONNX writer, driving ``onnxruntime.quantization.quantize_static`` with our parameters.

ONNX Runtime's quantizer is well kept (op coverage, bias quantization, Relu/Clip folding, QDQ
placement its kernels fuse), so we do not re-implement it; we only decide the numbers:

* activation ranges go in through ``calibration_cache_path`` (a TensorsData JSON), so ORT runs
  no calibration of its own;
* the exact scale / zero point of every activation and every weight channel go in through
  ``TensorQuantOverrides``, and ``QDQDisableWeightAdjustForInt32Bias`` stops ORT from silently
  rescaling weights;
* :func:`read_qdq_params` reads the written model back, and :func:`write_qdq` checks that each
  scale in it is the one we computed (raising if ORT changed any).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError
from calibration.graph import (WEIGHTED_OPS, consumer_map, drop_unused_initializers, producer_map, replace_nodes,
                               tensor_dims)
from calibration.observers import QParams


@dataclass
class QdqResult:
    """What :func:`write_qdq` wrote.

    Attributes:
        path: the QDQ model.
        activations: tensor -> (scale, zero point) as written.
        weights: weight initializer -> (scales, zero points) as written.
        mismatches: tensors whose written scale differs from the requested one (tolerated only
            for ops ORT forces to share their input's parameters, e.g. MaxPool, Reshape).
    """

    path: Path
    activations: dict[str, tuple[float, int]] = field(default_factory=dict)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def _quant_type(dtype: str):  # -> QuantType
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if dtype == "int8" else QuantType.QUInt8


def build_overrides(
    acts: dict[str, QParams], weights: dict[str, QParams]
) -> dict[str, list[dict[str, object]]]:
    """TensorQuantOverrides: exact scale/zero point per activation and per weight channel."""
    over: dict[str, list[dict[str, object]]] = {}
    for name, q in acts.items():
        zp_type = np.int8 if q.dtype == "int8" else np.uint8
        over[name] = [
            {
                "quant_type": _quant_type(q.dtype),
                "scale": np.array(q.scale, np.float32),
                "zero_point": np.array(q.zero_point, zp_type),
            }
        ]
    for name, q in weights.items():
        scales = np.atleast_1d(q.scale)
        entries: list[dict[str, object]] = [
            {"quant_type": _quant_type("int8"), "scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
            for s in scales
        ]
        if q.axis is not None:
            entries[0]["axis"] = int(q.axis)
        over[name] = entries
    return over


def write_qdq(
    model_path: Path,
    output: Path,
    ranges: dict[str, tuple[float, float]],
    acts: dict[str, QParams],
    weights: dict[str, QParams],
    symmetric: bool,
    per_channel: bool,
    nodes_to_exclude: Iterable[str] = (),
    verify: bool = True,
    quantize_bias: bool = True,
    float_tensors: Iterable[str] = (),
    ort_fusions: bool = False,
) -> QdqResult:
    """Write a QDQ model whose scales are exactly ``acts`` and ``weights``.

    Args:
        model_path: fp32 ONNX model.
        output: where to write the QDQ model.
        ranges: activation tensor -> (lo, hi) (what ORT would have calibrated).
        acts: activation tensor -> per-tensor parameters.
        weights: weight initializer -> per-channel (or per-tensor) parameters.
        symmetric: activations are symmetric int8 (else uint8).
        per_channel: weights per output channel.
        nodes_to_exclude: nodes left in float (fallback).
        verify: read the output back and compare its scales with the requested ones.
        quantize_bias: int32 bias (ONNX Runtime); False keeps float bias (TensorRT's explicit
            quantization wants float bias and fuses it itself).
        float_tensors: activations to leave in float (the inputs of fallback layers). ORT
            insists on quantizing every output of a quantized node, so their Q/DQ pairs are
            removed after writing; ReLU/Clip are then kept as nodes (ORT would otherwise fold
            them into the very Q we remove).
        ort_fusions: shape the graph for ONNX Runtime's int8 fusions: turn the weight
            DequantizeLinears of layers whose output stays float into float initializers
            (:func:`fold_unfused_weights`; its kernels only fuse a layer whose output is quantized
            too) and spatial means into GlobalAveragePool (:func:`pool_spatial_means`). TensorRT
            runs int8-in/float-out layers itself, so its writer leaves them.

    Returns:
        The written parameters and any mismatch.

    Raises:
        CalibrationError: quantization failed, or a written scale differs from ours on a tensor
            ORT had no reason to change.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    floats = set(float_tensors)
    _quantize_static(model_path, output, ranges, build_overrides(acts, weights), symmetric, per_channel,
                     list(nodes_to_exclude), quantize_bias, keep_removable=bool(floats))
    if floats:
        strip_qdq(output, floats)
    result = QdqResult(output)
    result.activations, result.weights = read_qdq_params(output)
    if verify:
        result.mismatches = _compare(result, acts, weights)
    if ort_fusions:
        fold_unfused_weights(output)
        pool_spatial_means(output)
    return result


def _quantize_static(model_path: Path, output: Path, ranges: dict[str, tuple[float, float]],
                     overrides: dict[str, Any], symmetric: bool, per_channel: bool, nodes_to_exclude: list[str],
                     quantize_bias: bool, keep_removable: bool) -> None:
    """ONNX Runtime's QDQ writer, fed our ranges as its calibration cache and our exact scales as
    tensor overrides (so it calibrates nothing itself)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="edgeship-qdq-") as tmp:
        cache = Path(tmp) / "ranges.json"
        data = {
            n: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for n, (lo, hi) in ranges.items()
        }
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        try:
            quantize_static(
                str(model_path),
                str(output),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                nodes_to_exclude=nodes_to_exclude,
                calibration_cache_path=str(cache),
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    "TensorQuantOverrides": overrides,
                    "QDQDisableWeightAdjustForInt32Bias": True,
                    "QuantizeBias": quantize_bias,
                    "QDQKeepRemovableActivations": keep_removable,
                },
            )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CalibrationError(f"onnxruntime quantize_static failed on {str(model_path)!r}: {exc}") from exc


def strip_qdq(path: Path, tensors: set[str]) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pairs on ``tensors`` (consumers read the
    float tensor again). Returns the number of pairs removed."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    nodes = list(g.node)
    # indices, not id(): protobuf wrappers are transient and their ids get reused
    q_idx = {nodes[i].output[0]: i for i in range(len(nodes))
             if nodes[i].op_type == "QuantizeLinear" and nodes[i].input[0] in tensors}
    remove: set[int] = set(q_idx.values())
    rewire: dict[str, str] = {}
    for i, n in enumerate(nodes):
        if n.op_type == "DequantizeLinear" and n.input[0] in q_idx:
            rewire[n.output[0]] = nodes[q_idx[n.input[0]]].input[0]
            remove.add(i)
    if {o.name for o in g.output} & set(rewire):
        raise CalibrationError("cannot keep a graph output in float by stripping its Q/DQ")
    kept = [n for i, n in enumerate(nodes) if i not in remove]
    for n in kept:
        for k, name in enumerate(n.input):
            if name in rewire:
                n.input[k] = rewire[name]
    replace_nodes(g, kept)
    drop_unused_initializers(g)  # the removed pairs' scales and zero points
    onnx.save(model, str(path))
    return len(rewire)


def fold_unfused_weights(path: Path) -> int:
    """Replace ``DequantizeLinear(int8 weight)`` by its float value where the layer cannot run in int8.

    A layer just before a float fallback keeps quantized inputs but a float output, and ONNX
    Runtime fuses DQ -> Conv -> Q into QLinearConv only with the Q. Without it the session
    dequantizes the weight on every run and, the weight no longer being a constant, runs the
    generic convolution instead of its prepacked NCHWc kernel (MobileNetV2 with 20 float layers:
    8 such convolutions cost as much as the whole fp32 model's). The folded weight is exactly
    ``(q - zero_point) * scale``, so the outputs do not change. Returns the number folded.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers = consumer_map(g)
    producer = producer_map(g)
    folded: set[str] = set()  # the folded DequantizeLinears' outputs, now initializers
    for n in g.node:
        if n.op_type not in WEIGHTED_OPS or all(_quantized(o, consumers) for o in n.output):
            continue
        for name in n.input[1:]:
            dq = producer.get(name)
            if (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits
                    and len(consumers[name]) == 1):
                g.initializer.append(_dequantized(dq, inits, name))
                folded.add(name)
    if folded:
        keep = [n for n in g.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
        replace_nodes(g, keep)
        drop_unused_initializers(g)
        onnx.save(model, str(path))
    return len(folded)


def pool_spatial_means(path: Path) -> int:
    """Turn quantized spatial means (``ReduceMean`` over H and W of an NCHW tensor, dimensions
    kept) into ``GlobalAveragePool``, the same arithmetic.

    PyTorch's exporter writes ``adaptive_avg_pool2d(x, 1)`` as a ReduceMean, which ONNX Runtime
    has no int8 kernel for: it runs DequantizeLinear, a float mean and QuantizeLinear. Its QDQ
    fusion turns DQ -> GlobalAveragePool -> Q into one QLinearGlobalAveragePool (MobileNetV2's
    pool: 0.57 ms of DQ and mean to 0.18 ms in ONNX Runtime's profiler). Where the Q comes after
    the flatten (Reshape or Flatten) that follows the mean, the two swap: a Q is elementwise, so
    quantizing before reshaping gives the same integers. Only a mean read from a DequantizeLinear
    and quantized is changed; a float one stays as it is. Returns the number rewritten.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    ranks = {name: len(dims) for name, dims in tensor_dims(model).items()}
    consumers = consumer_map(g)
    producer = producer_map(g)
    inits = {i.name: i for i in g.initializer}
    changed = 0
    for n in g.node:
        x = n.input[0] if n.op_type == "ReduceMean" else None
        axes = _reduced_axes(n, inits) if x is not None and ranks.get(x) == 4 else None
        dq = producer.get(x) if axes is not None and {a % 4 for a in axes} == {2, 3} else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        readers = consumers.get(n.output[0], [])
        if not readers or any(r.op_type != "QuantizeLinear" for r in readers):
            flat = _flatten_then_quantize(readers, consumers)
            if flat is None:
                continue
            _quantize_before(*flat)
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        changed += 1
    if changed:
        drop_unused_initializers(g)  # the axes
        onnx.save(model, str(path))
    return changed


def _flatten_then_quantize(readers: list[Any], consumers: dict[str, list[Any]]) -> tuple[Any, Any] | None:
    """(the flatten, its Q) where a mean's only reader is a Reshape/Flatten read by one Q alone."""
    if len(readers) != 1 or readers[0].op_type not in ("Reshape", "Flatten"):
        return None
    after = consumers.get(readers[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "QuantizeLinear":
        return None
    return readers[0], after[0]


def _quantize_before(shape: Any, q: Any) -> None:
    """Rewire ``x -> shape -> q -> y`` as ``x -> q -> shape -> y`` and swap the two nodes' places
    in the graph, so the order stays topological (``shape`` came first)."""
    q.input[0], shape.input[0] = shape.input[0], f"{shape.input[0]}_quantized"
    q.output[0], shape.output[0] = shape.input[0], q.output[0]
    earlier = type(shape)()
    earlier.CopyFrom(q)
    q.CopyFrom(shape)
    shape.CopyFrom(earlier)


def _reduced_axes(node: Any, inits: dict[str, Any]) -> set[int] | None:
    """The axes a ReduceMean with ``keepdims=1`` reduces (attribute before opset 18, input since);
    None for anything else (dimensions dropped, axes computed at run time, noop_with_empty_axes)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("keepdims", 1) != 1 or attrs.get("noop_with_empty_axes", 0) != 0:
        return None
    if "axes" in attrs:
        return {int(a) for a in attrs["axes"]}
    if len(node.input) > 1 and node.input[1] in inits:
        return {int(a) for a in numpy_helper.to_array(inits[node.input[1]]).ravel()}
    return None


#: ONNX Runtime's x86 symmetric int8 convolution (MLAS ``ConvSym``: requantization fused, no
#: im2col buffer) takes input channels in multiples of 4; a conv reading 3 (an RGB stem) falls
#: back to im2col + QGEMM, which took 0.33 ms where the same conv padded to 4 channels took 0.17
#: ms (224x224 -> 32 channels, stride 2, 2 threads, this AVX-512 VNNI CPU).
ORT_CHANNEL_ALIGN = 4


def pad_conv_channels(path: Path, align: int) -> int:
    """Pad the input channels of int8 convs to a multiple of ``align``, with zero weights.

    Where a conv (one group) reads ``DequantizeLinear(QuantizeLinear(x))`` and an int8 weight
    with ``c % align`` input channels, a Pad inserted between the Q and the DQ appends channels
    holding the zero point, and the weight gets as many all-zero input channels: every output is
    the same sum (the added products are 0 x value), so the model's outputs do not change, but
    ONNX Runtime's fused symmetric kernel takes the conv. The uint8 Pad is cheaper than a float
    one before the Q (0.03 ms vs 0.08 for a 224x224 image). Returns the number of convs padded.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    if _default_opset(model) < 11:  # Pad's pads became an input in opset 11
        return 0
    inits = {i.name: i for i in g.initializer}
    consumers = consumer_map(g)
    producer = producer_map(g)
    pads: list[tuple[Any, Any]] = []  # (the DQ that reads the padded tensor, the Pad node)
    for conv in g.node:
        found = _narrow_int8_conv(conv, producer, consumers, inits, align)
        if found is not None:
            pads.append(_pad_input(g, conv, *found, align))
    if pads:
        before = {dq.output[0]: pad for dq, pad in pads}  # names: protobuf wrappers are transient
        replace_nodes(g, [m for n in list(g.node) for m in
                          ((before[n.output[0]], n) if n.output[0] in before else (n,))])
        onnx.save(model, str(path))
    return len(pads)


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _narrow_int8_conv(conv: Any, producer: dict[str, Any], consumers: dict[str, list[Any]],
                      inits: dict[str, Any], align: int) -> tuple[Any, Any, Any] | None:
    """(activation Q, activation DQ, weight initializer) of a one-group conv whose int8 weight has
    ``c % align`` input channels and whose quantized input only it reads; else None."""
    if conv.op_type != "Conv" or any(a.name == "group" and a.i != 1 for a in conv.attribute):
        return None
    dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
    if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
        return None
    q_x = producer.get(dq_x.input[0])
    weight = inits.get(dq_w.input[0])
    if (q_x is None or q_x.op_type != "QuantizeLinear" or len(q_x.input) < 3 or weight is None
            or len(weight.dims) < 3 or weight.dims[1] % align == 0):
        return None
    if any(len(consumers.get(t, [])) != 1 for t in (dq_x.output[0], dq_w.output[0], weight.name)):
        return None  # another reader would see the padded tensor or weight
    if any(t not in inits or len(inits[t].dims) for t in (q_x.input[2], dq_x.input[1])):
        return None  # Pad's value must be one scalar, and a per-channel input scale has no padded channel
    from onnx import numpy_helper

    w_zero = inits.get(dq_w.input[2]) if len(dq_w.input) > 2 and dq_w.input[2] else None
    if w_zero is not None and np.any(numpy_helper.to_array(w_zero)):
        return None  # a zero weight is then not the integer 0
    return q_x, dq_x, weight


def _pad_input(g: Any, conv: Any, q_x: Any, dq_x: Any, weight: Any, align: int) -> tuple[Any, Any]:
    """Append zero input channels to ``weight`` and a Pad (value: the Q's zero point) to the
    activation between ``q_x`` and ``dq_x``; return (dq_x, the Pad node) for insertion."""
    from onnx import helper, numpy_helper

    w = numpy_helper.to_array(weight)
    extra = align - w.shape[1] % align
    zeros = np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)
    weight.CopyFrom(numpy_helper.from_array(np.concatenate([w, zeros], axis=1), weight.name))
    widths = np.zeros(2 * w.ndim, np.int64)
    widths[w.ndim + 1] = extra  # the end of axis 1 (channels), NCHW
    pads = numpy_helper.from_array(widths, f"{conv.name}_channel_pads")
    g.initializer.append(pads)
    padded = f"{q_x.output[0]}_channels_padded"
    node = helper.make_node("Pad", [q_x.output[0], pads.name, q_x.input[2]], [padded],
                            name=f"{conv.name}_channel_pad", mode="constant")
    dq_x.input[0] = padded
    return dq_x, node


def _quantized(tensor: str, consumers: dict[str, list[Any]]) -> bool:
    """Whether ``tensor`` is only read by QuantizeLinear, directly or through ReLU/Clip (which
    ONNX Runtime folds into the Q), so its producer fuses into an int8 kernel."""
    found = consumers.get(tensor, [])
    return bool(found) and all(
        c.op_type == "QuantizeLinear"
        or (c.op_type in ("Relu", "Clip") and all(_quantized(o, consumers) for o in c.output))
        for c in found)


def _dequantized(dq: Any, inits: dict[str, Any], name: str) -> Any:
    """The float initializer ``name`` holding what ``dq`` computes (per-tensor or along its axis)."""
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
          if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape))
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    # float32 product, as DequantizeLinear computes it: the session's outputs stay bit-identical
    return numpy_helper.from_array((q - zp).astype(np.float32) * scale, name)


def read_qdq_params(path: Path) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read (scale, zero point) back from a QDQ model.

    Activations are keyed by the float tensor a QuantizeLinear quantizes; weights by the float
    initializer name (ORT stores ``<w>_quantized`` and dequantizes it with a DequantizeLinear).

    Returns:
        (activations, weights).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    acts: dict[str, tuple[float, int]] = {}
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in model.graph.node:
        scale = inits.get(node.input[1]) if len(node.input) > 1 else None
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None:
            continue
        zp_arr = np.zeros(scale.shape, np.int64) if zp is None else zp.astype(np.int64)
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            name = node.input[0]
            # ORT renames a graph output's float tensor so the final DQ can keep the name
            if name.endswith("_QuantizeLinear_Input"):
                name = name[: -len("_QuantizeLinear_Input")]
            acts[name] = (float(scale), int(zp_arr))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith("_quantized"):
            weights[node.input[0][: -len("_quantized")]] = (scale.astype(np.float32), zp_arr)
    return acts, weights


def _compare(result: QdqResult, acts: dict[str, QParams], weights: dict[str, QParams]) -> list[str]:
    bad: list[str] = []
    for name, (s, z) in result.activations.items():
        q = acts.get(name)
        if q is not None and (not np.isclose(s, float(q.scale), rtol=1e-6) or z != int(q.zero_point)):
            bad.append(name)
    for name, (s, z) in result.weights.items():
        q = weights.get(name)
        if q is None or s.size != np.atleast_1d(q.scale).size:
            continue  # e.g. a bias (int32, derived from input x weight scales)
        if not np.allclose(s.ravel(), np.atleast_1d(q.scale), rtol=1e-6) or z.any():
            raise CalibrationError(
                f"onnxruntime wrote weight scales for {name!r} that differ from the calibrated ones; "
                "the QDQ model would not match the other backends"
            )
    return bad
