"""PT2E quantizer for TFLite that also fuses Conv + ReLU6.

litert-torch's ``PT2EQuantizer`` fuses Conv + ReLU (one observer after the ReLU) but treats
``hardtanh`` (ReLU6) as an op that *shares* its input's observer. For Conv -> ReLU6 that means
the int8 scale is fitted to the raw convolution output (on EfficientNet-Lite0 up to |x| ~ 140)
while the tensor that flows on only spans [0, 6]: about five int8 steps are left for it and the
model collapses (measured: 2.8 dB output SQNR, 46 % top-1 agreement with fp32).

:func:`make_quantizer` returns a quantizer that first annotates Conv -> hardtanh(0, 6) the way
Conv -> ReLU is annotated (inputs and weights on the conv, the output observer after the clamp),
then lets the stock annotators handle everything else. TFLite's converter folds the clamp into the
convolution as its fused RELU6 activation, exactly as it does for ReLU.

It also annotates the binary ops (ADD, MUL) of two activations itself: the stock ``add`` / ``mul``
annotators find their ops through ``source_fn_stack``, which ``torch.export`` no longer records,
so they annotate nothing and every residual ADD stayed float behind a DEQUANTIZE pair and a
QUANTIZE (EfficientNet-Lite0 int8: ADD x7 float, 17 Q/DQ ops left inside; MobileNetV2: ADD x9, 22).

Imports torch / litert_torch / torchao lazily (inside the functions).
"""

from __future__ import annotations

from typing import Any

CONVS = ("conv1d", "conv2d", "convolution")
_RELU6_BOUNDS = (0.0, 6.0)


def is_call(node: Any, names: tuple[str, ...]) -> bool:
    """Whether ``node`` calls one of the aten ops ``names`` (any overload)."""
    if getattr(node, "op", None) != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return packet is not None and packet.__name__.rstrip("_") in names


def _is_relu6(node: Any) -> bool:
    if not is_call(node, ("hardtanh",)):
        return False
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return (float(lo), float(hi)) == _RELU6_BOUNDS


def _module_name(node: Any) -> str:
    """Qualified name of the innermost nn.Module a graph node came from ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


#: ops whose output PT2E quantizes with their input's parameters (the int8 tensor flows through)
PASS_THROUGH = ("relu", "relu6", "hardtanh", "constant_pad_nd", "pad", "view", "reshape", "flatten",
                "max_pool2d", "permute", "squeeze", "unsqueeze", "clone", "dropout")


#: binary ops TFLite runs in int8 when both inputs are activations (:func:`annotate_binary`)
BINARY = ("add", "mul")


def _producer(node: Any) -> Any:
    """The conv / linear / binary node whose output reaches ``node``'s first input through
    pass-through ops only (None if another op, or the graph input, produces it)."""
    src = node.args[0] if node.args else None
    while src is not None and getattr(src, "op", None) == "call_function":
        if is_call(src, CONVS + ("linear", "addmm") + BINARY):
            return src
        if not is_call(src, PASS_THROUGH) or not src.args:
            return None
        src = src.args[0]
    return None


def fold_zero_pads(model: Any) -> int:
    """Fold symmetric zero padding into the convolutions that read it (in place).

    Models written for TF-style "same" padding (EfficientNet's ``Conv2dStaticSamePadding``) put
    an explicit ``pad`` before each conv. In a float graph litert-torch folds it; in the PT2E
    graph the pad sits between quantize / dequantize pairs, stays a PAD op, and its NCHW layout
    costs a TRANSPOSE on each side (EfficientNet-Lite0 int8: 16 PADs, 31 TRANSPOSEs). A zero
    pad with equal sides is exactly the conv's own ``padding``, so it is moved there. Uneven pads
    (stride-2 "same") have no torch conv padding; :mod:`pipeline.backends.tflite.padfold` folds
    them into TFLite's SAME padding on the converted flatbuffer.

    Returns:
        The number of pads folded.
    """
    folded = 0
    for node in list(model.graph.nodes):
        if not is_call(node, ("pad", "constant_pad_nd")) or len(node.args) < 2:
            continue
        pads = list(node.args[1])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
        if mode != "constant" or (value or 0.0) != 0.0 or len(pads) != 4 or pads[0] != pads[1] or pads[2] != pads[3]:
            continue
        users = list(node.users)
        if not users or not all(is_call(u, ("conv2d",)) and u.args[0] is node and not u.kwargs
                                and list(u.args[4] if len(u.args) > 4 else (0, 0)) == [0, 0] for u in users):
            continue
        for conv in users:
            args = list(conv.args) + [None, [1, 1], [0, 0]][len(conv.args) - 2:]
            args[4] = [pads[2], pads[0]]
            conv.args = tuple(args)
        node.replace_all_uses_with(node.args[0])
        model.graph.erase_node(node)
        folded += 1
    if folded:
        model.graph.lint()
        model.recompile()
    return folded


def keep_float(model: Any, layers: list[str]) -> list[str]:
    """Mark the conv / linear nodes of the named modules as handled-without-quantization.

    The stock annotators skip nodes that are already annotated, so these ops stay float and
    PT2E puts a quantize/dequantize pair at their boundaries (TFLite: DEQUANTIZE -> float op ->
    QUANTIZE). Names match the module path, also under a wrapper (``wrapped.<name>``).

    A float layer should also *read* a float tensor: a layer is usually sensitive because its
    input's int8 range is a poor fit (one channel stretching it), and DEQUANTIZE cannot restore
    what the int8 tensor lost. That tensor is quantized as its producer's output, so a conv /
    linear that feeds a float layer through pass-through ops (ReLU, ReLU6, padding, reshapes)
    stays float with it; it is returned too, so reports list every float layer. A residual ADD
    (or MUL) producing that tensor stays float the same way, listed as ``<module>/<node>``
    (``features.3/add``): its inputs are then dequantized, as before ADDs ran in int8.

    Returns:
        The module names whose nodes stay float, the named ones and the producers they pull in.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    matched = []
    for node in model.graph.nodes:
        if not is_call(node, CONVS + ("linear", "addmm")):
            continue
        name = _module_name(node)
        hit = next((n for n in layers if name == n or name.endswith("." + n)), None)
        if hit is None:
            continue
        matched.append(hit)
        node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
        producer = _producer(node)
        if producer is not None:
            producer.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            matched.append(_float_name(producer))
    return sorted(set(matched))


def _float_name(node: Any) -> str:
    """How reports name a node kept float: its module (conv / linear), or module/node for an op
    that is not a module of its own (a residual ADD)."""
    module = _module_name(node).removeprefix("wrapped.")
    if is_call(node, CONVS + ("linear", "addmm")):
        return module
    return f"{module}/{node.name}" if module else node.name


def annotate_conv_relu6(model: Any, config: Any) -> int:
    """Annotate every Conv -> ReLU6 pair of ``model`` (an FX graph) as one quantized unit.

    Args:
        model: the exported graph module being prepared.
        config: litert-torch's QuantizationConfig (static).

    Returns:
        The number of pairs annotated.
    """
    from litert_torch.quantize.pt2e_quantizer_utils import (
        get_bias_qspec,
        get_input_act_qspec,
        get_output_act_qspec,
        get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    count = 0
    for clamp in model.graph.nodes:
        if not _is_relu6(clamp):
            continue
        conv = clamp.args[0]
        # the conv's raw output must feed nothing but the clamp, or fusing would change semantics
        if not is_call(conv, CONVS) or len(conv.users) != 1:
            continue
        if any("quantization_annotation" in n.meta for n in (conv, clamp)):
            continue
        qspecs = {conv.args[0]: get_input_act_qspec(config), conv.args[1]: get_weight_qspec(config)}
        bias = conv.args[2] if len(conv.args) > 2 else None
        if bias is not None and hasattr(bias, "meta"):
            qspecs[bias] = get_bias_qspec(config)
        conv.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta["quantization_annotation"] = QuantizationAnnotation(
            output_qspec=get_output_act_qspec(config), _annotated=True)
        for const in (conv.args[1], bias):
            if const is not None and hasattr(const, "meta"):
                const.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
        count += 1
    return count


def _is_activation(arg: Any) -> bool:
    """A float tensor computed by the graph (not a constant, nor a Python scalar)."""
    val = getattr(arg, "meta", {}).get("val")
    return (getattr(arg, "op", None) in ("call_function", "call_module", "placeholder")
            and getattr(val, "is_floating_point", lambda: False)())


def annotate_binary(model: Any, config: Any) -> int:
    """Annotate every ADD / MUL of two activations of ``model`` (an FX graph) for int8.

    Both inputs get the activation qspec (a producer with an output observer shares it: a conv's
    output feeds its ADD without a requantize), and the output its own observer; the plan's range
    reaches it by value like any other (ranges.py pairs it with the ONNX Add's output). An ADD
    read only by a ReLU / ReLU6 puts the output observer after the clamp, as for a conv: TFLite
    fuses the clamp into the ADD. Ops with a constant operand (``x + 3``), an ``alpha`` or an
    annotation already (kept float by :func:`keep_float`) are left alone, so they stay float.

    Returns:
        The number of ops annotated.
    """
    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec, get_output_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    count = 0
    for node in model.graph.nodes:
        if not is_call(node, BINARY) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        if not all(_is_activation(a) for a in node.args) or "quantization_annotation" in node.meta:
            continue
        users = list(node.users)
        clamp = users[0] if len(users) == 1 and (is_call(users[0], ("relu",)) or _is_relu6(users[0])) \
            and "quantization_annotation" not in users[0].meta else None
        output = get_output_act_qspec(config)
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={a: get_input_act_qspec(config) for a in node.args},
            output_qspec=None if clamp is not None else output, _annotated=True)
        if clamp is not None:
            clamp.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=output, _annotated=True)
        count += 1
    return count


OBSERVERS = ("histogram", "minmax")


def make_quantizer(per_channel: bool, observer: str = "histogram", float_layers: list[str] | None = None) -> Any:
    """A static symmetric-int8 PT2E quantizer (litert-torch's) that also fuses Conv + ReLU6 and
    runs ADD / MUL of two activations in int8.

    Args:
        float_layers: module names whose conv / linear stay float (fallback, user option).
        per_channel: per-output-channel weight scales (else per tensor).
        observer: activation observer. ``histogram`` (litert-torch's default) clips ranges to
            minimise L2 error but costs seconds per sample on large models; ``minmax`` keeps
            the full observed range and is ~10x faster.
    """
    import dataclasses

    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import MinMaxObserver

    if observer not in OBSERVERS:
        raise ValueError(f"unknown activation observer {observer!r}; choose one of {OBSERVERS}")

    class _Quantizer(PT2EQuantizer):
        """PT2EQuantizer + Conv/ReLU6 fusion + int8 ADD / MUL (see module docstring)."""

        fused_relu6 = 0
        int8_binary = 0
        kept_float: list[str] = []

        def annotate(self, model: Any) -> Any:
            if self.global_config is not None and self.global_config.input_activation is not None:
                self.kept_float = keep_float(model, list(float_layers or ()))
                self.fused_relu6 = annotate_conv_relu6(model, self.global_config)
                self.int8_binary = annotate_binary(model, self.global_config)
            return super().annotate(model)

    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    if observer == "minmax":
        act = dataclasses.replace(config.input_activation,
                                  observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    return _Quantizer().set_global(config)
