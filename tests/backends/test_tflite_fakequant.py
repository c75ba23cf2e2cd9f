"""The INT8 search scores TFLite candidates with fused fake-quant ops: the same numbers as the
decomposed quantize/dequantize graph litert-torch converts, which itself stays untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")


def _converted() -> tuple[object, object]:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from pipeline.backends.tflite.quantizer import make_quantizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    x = torch.randn(8, 3, 32, 32)
    graph = prepare_pt2e(torch.export.export(model, (x,)).module(), make_quantizer(True, "minmax", []))
    graph(x)  # calibrate the observers
    return convert_pt2e(graph, fold_quantize=False), x


def _count(gm: object, name: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))  # type: ignore[attr-defined]


def test_fused_graph_computes_the_same_numbers() -> None:
    from pipeline.backends.tflite.fakequant import fuse_fake_quant

    graph, x = _converted()
    pairs = _count(graph, "dequantize_per_tensor")
    weights = _count(graph, "dequantize_per_channel")
    fused, done = fuse_fake_quant(graph)
    assert done == {"activations": pairs, "weights": weights} and pairs > 0 and weights == 3
    assert _count(fused, "quantized_decomposed") == 0  # every pair rewritten or folded
    assert _count(fused, "fake_quant") == pairs
    with torch.no_grad():
        assert torch.equal(fused(x), graph(x))  # type: ignore[operator]
        # off the calibration range too: clamping must agree, not only rounding
        wide = 8 * torch.randn(8, 3, 32, 32)
        assert torch.equal(fused(wide), graph(wide))  # type: ignore[operator]
    assert _count(graph, "dequantize_per_tensor") == pairs  # what litert-torch converts is untouched
    assert _count(graph, "dequantize_per_channel") == weights


def test_fake_quant_matches_the_decomposed_pair_on_ties_and_clamps() -> None:
    from torch.ao.quantization.fx import _decomposed  # noqa: F401 - registers the ops

    from pipeline.backends.tflite.fakequant import fake_quant

    ops = torch.ops.quantized_decomposed
    scale, zero_point = 0.037, -7
    x = torch.cat([torch.arange(-400, 400) * (scale / 2), 50 * torch.randn(1000)])  # half-way ties, far outside
    q = ops.quantize_per_tensor.default(x, scale, zero_point, -128, 127, torch.int8)
    expected = ops.dequantize_per_tensor.default(q, scale, zero_point, -128, 127, torch.int8)
    assert torch.equal(fake_quant(x, scale, zero_point, -128, 127), expected)
