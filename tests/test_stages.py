"""Stages: Conv+BN folding numerics, export numerics, content-addressed cache hits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _conv_bn_model(rng: np.random.Generator, with_bias: bool) -> "onnx.ModelProto":
    cin, cout = 3, 8
    w = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    conv_inputs = ["x", "W"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), "B"))
        conv_inputs.append("B")
    # Non-trivial BN statistics: scale, shift, running mean and variance far from identity.
    for name, arr in (("gamma", rng.uniform(0.5, 2.0, cout)), ("beta", rng.normal(size=cout)),
                      ("mean", rng.normal(size=cout) * 3), ("var", rng.uniform(0.1, 4.0, cout))):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cout, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: "onnx.ModelProto", x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_conv_bn_numerics(with_bias: bool) -> None:
    from pipeline.stages.optimize import count_ops, fold_conv_bn

    rng = np.random.default_rng(0)
    model = _conv_bn_model(rng, with_bias)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    folded = fold_conv_bn(model)
    assert folded == 1
    assert "BatchNormalization" not in count_ops(model)
    after = _run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert np.abs(before).max() > 1.0  # the check compares real signal, not zeros


def test_fold_skips_bn_whose_conv_output_is_shared() -> None:
    from pipeline.stages.optimize import fold_conv_bn

    model = _conv_bn_model(np.random.default_rng(1), True)
    # A second consumer of the conv output: folding would change what it sees, so it must not fold.
    model.graph.node.append(helper.make_node("Identity", ["c"], ["c2"]))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, [2, 8, 8, 8]))
    assert fold_conv_bn(model) == 0


@pytest.mark.slow
def test_export_and_optimize_mnist(tmp_path: Path, mnist_spec) -> None:
    """Real export of the MNIST CNN: matches PyTorch, optimized graph has no BatchNormalization."""
    import torch

    from pipeline.stages.export import export_onnx, run_onnx
    from pipeline.stages.inputs import load_samples, model_loader
    from pipeline.stages.optimize import count_ops, optimize_onnx

    calib = load_samples(mnist_spec, "calibration")
    art = export_onnx(mnist_spec, model_loader(mnist_spec), calib.x, tmp_path)
    assert art.info["export_check_max_abs_diff"] < 1e-3
    x = calib.x["input"]
    info = optimize_onnx(art.path, tmp_path / "opt.onnx", x[:16], 1)
    assert "BatchNormalization" not in count_ops(onnx.load(str(tmp_path / "opt.onnx")))
    model = model_loader(mnist_spec)()
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:16].copy())).numpy()
    got = run_onnx(tmp_path / "opt.onnx", x[:16], 1)["output"]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    assert info["ops_after"].get("Conv") == 3


def test_export_check_catches_a_wrong_export(tmp_path: Path) -> None:
    """The numeric check fails when ONNX and PyTorch disagree (the model changes after export)."""
    import torch

    from pipeline.errors import ConversionError
    from pipeline.stages.export import check_against_torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:1]),), str(path), dynamo=True, external_data=False,
                      input_names=["input"])
    check_against_torch(model, path, {"input": x}, 1)  # agrees
    with torch.no_grad():
        model[0].weight.add_(0.5)
    with pytest.raises(ConversionError, match="disagrees with PyTorch"):
        check_against_torch(model, path, {"input": x}, 1)


def test_cache_hit_and_atomic_failure(tmp_path: Path) -> None:
    from pipeline.cache import Cache

    cache = Cache(tmp_path)
    calls = []

    def build(d: Path) -> None:
        calls.append(1)
        (d / "out.txt").write_text("x")

    first = cache.get_or_build("s", {"a": 1}, build)
    second = cache.get_or_build("s", {"a": 1}, build)
    assert not first.hit and second.hit and len(calls) == 1 and first.path == second.path
    third = cache.get_or_build("s", {"a": 2}, build)
    assert not third.hit and third.path != first.path

    def broken(d: Path) -> None:
        (d / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("s", {"a": 3}, broken)
    entry = cache.entry("s", __import__("pipeline.cache", fromlist=["key_of"]).key_of({"stage": "s", "a": 3}))
    assert not entry.exists()
    assert not list(entry.parent.glob(".*"))  # no temp leftovers
    assert (first.path / "out.txt").read_text() == "x"  # old entries untouched


def _model_with_external(tmp_path: Path, location: str) -> Path:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph)
    from onnx.external_data_helper import set_external_data

    tensor = model.graph.initializer[0]
    set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    path = tmp_path / "models" / "m.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    from pipeline.errors import SpecError
    from pipeline.stages.onnx_guard import check_external_data

    (tmp_path / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    path = _model_with_external(tmp_path, location)
    with pytest.raises(SpecError, match="outside the model's folder"):
        check_external_data(path)


def test_external_data_symlink_leaving_folder_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import SpecError
    from pipeline.stages.onnx_guard import check_external_data

    (tmp_path / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    path = _model_with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(SpecError, match="outside the model's folder"):
        check_external_data(path)


def test_external_data_inside_folder_is_accepted(tmp_path: Path) -> None:
    from pipeline.stages.onnx_guard import check_external_data

    path = _model_with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.ones(16, np.float32).tobytes())
    assert check_external_data(path) == ["weights.bin"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": np.ones((1, 4), np.float32)})[0], 4.0)


@pytest.mark.slow
def test_dynamic_batch_export(tmp_path: Path, mnist_spec) -> None:
    """batch: dynamic gives a symbolic batch dim; the same model runs batch 1 and batch 7."""
    from pipeline.stages.export import export_onnx, run_onnx
    from pipeline.stages.inputs import load_samples, model_loader

    spec = mnist_spec.model_copy(deep=True)
    spec.input.batch = "dynamic"
    calib = load_samples(spec, "calibration")
    art = export_onnx(spec, model_loader(spec), calib.x, tmp_path)
    dim0 = onnx.load(str(art.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    one = run_onnx(art.path, calib.x["input"][:14], 1)["output"]
    seven = run_onnx(art.path, calib.x["input"][:14], 7)["output"]
    np.testing.assert_allclose(one, seven, rtol=1e-4, atol=1e-5)


def test_analyze_counts_conv_macs_and_params(tmp_path: Path) -> None:
    from pipeline.analyze import analyze_onnx

    model = _conv_bn_model(np.random.default_rng(0), True)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    a = analyze_onnx(path)
    # Conv 3->8, 3x3, output 2x8x8x8: MACs = 2*8*8*8 * (3*3*3), + one bias add per output element
    assert a["macs_by_op"]["Conv"] == 2 * 8 * 8 * 8 * 27 + 2 * 8 * 8 * 8
    assert a["params"] == 8 * 3 * 3 * 3 + 8 + 4 * 8
    assert a["flops"] == 2 * a["macs"]
    # Peak live activations: at most input + two intermediates; total counts all three outputs.
    assert a["activation_bytes_total"] == 3 * 2 * 8 * 8 * 8 * 4
    assert a["activation_bytes_peak"] <= 2 * 3 * 8 * 8 * 4 + 2 * (2 * 8 * 8 * 8 * 4)


def test_source_digest_changes_with_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter fix must invalidate what the old code built, even without a version bump."""
    import importlib

    from pipeline.cache import source_digest

    pkg = tmp_path / "fakeconv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "convert.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = source_digest("fakeconv")
    assert before == source_digest("fakeconv")
    (pkg / "convert.py").write_text("SCALE = 2\n")
    assert source_digest("fakeconv") != before


def test_cache_rebuilds_a_damaged_entry_and_says_so(tmp_path: Path) -> None:
    """Issue 11 #17: a cached entry is re-hashed on use; changed bytes are rebuilt, never served."""
    from pipeline.cache import COMPLETE, Cache

    cache = Cache(tmp_path)
    calls = []

    def build(d: Path) -> None:
        calls.append(1)
        (d / "out.txt").write_text("x")

    first = cache.get_or_build("s", {"a": 1}, build)
    (first.path / "out.txt").write_text("y")  # damaged after it was built
    second = cache.get_or_build("s", {"a": 1}, build)
    assert not second.hit and "corrupted" in second.note and len(calls) == 2
    assert second.path == first.path and (second.path / "out.txt").read_text() == "x"
    third = cache.get_or_build("s", {"a": 1}, build)
    assert third.hit and third.note == "" and len(calls) == 2
    # An entry written before entries carried a digest is rebuilt once, not trusted.
    (first.path / COMPLETE).write_text(third.key)
    fourth = cache.get_or_build("s", {"a": 1}, build)
    assert not fourth.hit and "no content digest" in fourth.note and len(calls) == 3


def test_cache_removes_temp_folders_of_builds_that_died(tmp_path: Path) -> None:
    """Issue 11 #17: a killed build's temp folder goes on the next run; a live builder's stays."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.cache import Cache

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    folder = tmp_path / "s" / "ab"
    folder.mkdir(parents=True)
    dead = folder / f".tmp-{gone}-abcdef012345-x"
    live = folder / f".tmp-{os.getpid()}-abcdef012345-y"
    old_style = folder / ".abcdef012345-z"  # an older edgeship's temp name: no pid, judged by age
    young_old_style = folder / ".abcdef012345-w"
    for d in (dead, live, old_style, young_old_style):
        d.mkdir()
        (d / "half.bin").write_bytes(b"half")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_style, (two_days_ago, two_days_ago))
    Cache(tmp_path).get_or_build("s", {"a": 1}, lambda d: (d / "out.txt").write_text("x"))
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and young_old_style.exists()
