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
    fused, n = fuse_fake_quant(graph)
    assert n == pairs > 0
    assert _count(fused, "quantized_decomposed.quantize_per_tensor") == 0 and _count(fused, "fake_quantize_per_tensor_affine") == n
    with torch.no_grad():
        assert torch.equal(fused(x), graph(x))  # type: ignore[operator]
        # off the calibration range too: clamping must agree, not only rounding
        wide = 8 * torch.randn(8, 3, 32, 32)
        assert torch.equal(fused(wide), graph(wide))  # type: ignore[operator]
    assert _count(graph, "dequantize_per_tensor") == pairs  # what litert-torch converts is untouched
