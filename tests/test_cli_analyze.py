"""`edgeship analyze` (issue 16): a per-layer table for every op type, --json, no release.

A small ONNX model whose numbers are worked out by hand below goes through the console script,
as a user runs it; the counting conventions are pipeline/analyze.py's docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli_helpers import EDGESHIP, lines

BATCH = 2


def _init(rng: np.random.Generator, name: str, shape: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def tiny_model(batch: int | str = "N") -> onnx.ModelProto:
    """x (batch, 3, 16, 16) -> conv 3->8 3x3 -> relu -> depthwise 3x3 (+ relu: residual add)
    -> maxpool 2x2 -> convtranspose 8->4 2x2 stride 2 -> global avg pool -> flatten -> gemm 4->10."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                         group=8),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "wt", "bt"], ["u"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["u"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [_init(rng, n, s) for n, s in (("w1", [8, 3, 3, 3]), ("b1", [8]), ("wd", [8, 1, 3, 3]), ("bd", [8]),
                                           ("wt", [8, 4, 2, 2]), ("bt", [4]), ("wf", [10, 4]), ("bf", [10]))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    graph = helper.make_graph(nodes, "tiny", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# By hand, batch 2. Conv: output elements x (Cin/group x kernel) + one bias add per output element.
CONV_OUT = BATCH * 8 * 16 * 16  # 4096
EXPECTED = {  # name: (op, output shape, params, macs, ops, activation bytes)
    "conv": ("Conv", [2, 8, 16, 16], 8 * 3 * 9 + 8, CONV_OUT * 27 + CONV_OUT, 0, CONV_OUT * 4),
    "relu": ("Relu", [2, 8, 16, 16], 0, 0, CONV_OUT, CONV_OUT * 4),  # one op per element
    "dw": ("Conv", [2, 8, 16, 16], 8 * 9 + 8, CONV_OUT * 9 + CONV_OUT, 0, CONV_OUT * 4),  # depthwise: Cin/group = 1
    "add": ("Add", [2, 8, 16, 16], 0, 0, CONV_OUT, CONV_OUT * 4),
    "pool": ("MaxPool", [2, 8, 8, 8], 0, 0, 2 * 8 * 8 * 8 * 4, 2 * 8 * 8 * 8 * 4),  # 4 kernel positions per output
    # ConvTranspose: every input element meets Cout x kernel weights: 1024 x (4 x 2 x 2), + bias per output
    "up": ("ConvTranspose", [2, 4, 16, 16], 8 * 4 * 4 + 4, 2 * 8 * 8 * 8 * 16 + 2 * 4 * 16 * 16, 0,
           2 * 4 * 16 * 16 * 4),
    # onnx-tool's weights: one add per input element, one division (4 ops) per output
    "gap": ("GlobalAveragePool", [2, 4, 1, 1], 0, 0, 2 * 4 * 16 * 16 + 2 * 4 * 4, 2 * 4 * 4),
    "flat": ("Flatten", [2, 4], 0, 0, 0, 2 * 4 * 4),
    "fc": ("Gemm", [2, 10], 4 * 10 + 10, 2 * 10 * 4 + 2 * 10, 0, 2 * 10 * 4),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder: the model (dynamic batch in the file, 2 in the spec), its data and spec."""
    onnx.save(tiny_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32), y=np.arange(8) % 10)
    spec = {"name": "tiny", "model": {"onnx": "m.onnx"},
            "input": {"name": "x", "shape": [BATCH, 3, 16, 16], "batch": "dynamic"},
            "calibration": {"source": {"kind": "npz", "path": "calib.npz"}},
            "evaluation": {"source": {"kind": "npz", "path": "eval.npz"}, "metric": "fidelity"}}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return tmp_path


def analyze(project: Path, *args: str, spec: str = "spec.yaml") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGESHIP_HOME": str(project / "home"), "COLUMNS": "200"}
    env.pop("EDGESHIP_STAGE_CACHE", None)
    return subprocess.run([str(EDGESHIP), "analyze", "--spec", spec, *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.backend("onnxruntime")
def test_json_has_every_layer_counted_by_hand_and_no_release_is_built(project: Path) -> None:
    r = analyze(project, "--json", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is the document alone
    rows = {row["name"]: row for row in doc["layers"]}
    assert [row["name"] for row in doc["layers"]] == list(EXPECTED)  # graph order, every node
    for name, (op, shape, params, macs, ops, act) in EXPECTED.items():
        row = rows[name]
        assert (row["op"], row["outputs"][0]["shape"], row["params"], row["macs"], row["ops"],
                row["activation_bytes"], row["counted"]) == (op, shape, params, macs, ops, act, True), name
    t = doc["totals"]
    assert t["params"] == sum(e[2] for e in EXPECTED.values()) == 486
    assert t["macs"] == sum(e[3] for e in EXPECTED.values()) and t["flops"] == 2 * t["macs"]
    assert t["ops"] == sum(e[4] for e in EXPECTED.values())
    assert t["activation_bytes_total"] == sum(e[5] for e in EXPECTED.values())
    # live at the residual add: relu's output (still needed), the depthwise output and the sum
    assert t["activation_bytes_peak"] == 3 * CONV_OUT * 4
    assert t["uncounted_ops"] == [] and "counter_error" not in t
    by_op = {r["op"]: r for r in doc["by_op"]}
    assert by_op["Conv"]["layers"] == 2 and by_op["Conv"]["macs"] == EXPECTED["conv"][3] + EXPECTED["dw"][3]
    assert doc["batch"] == BATCH and doc["spec"] == "tiny"
    # the table went to stderr, the progress lines too
    assert "by op type" in r.stderr and "optimize (fold, slim)" in r.stderr
    # no release, no device, no target folder: the stage cache (export, optimize) and the log only
    assert files_under(project / "build") == ["tiny/analyze.log"]
    assert sorted(p.name for p in (project / "home").iterdir()) == ["stages"]
    assert sorted(p.name for p in (project / "home" / "stages").iterdir()) == ["export", "optimize"]
    assert not list(project.rglob("manifest.json"))


@pytest.mark.slow
@pytest.mark.backend("onnxruntime")
def test_console_table_top_layers_all_layers_and_json_file(project: Path) -> None:
    r = analyze(project, "--top", "3")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert out[0].startswith("tiny: params 486 ")
    assert out[1] == "the 3 layers with the most MACs, of 9 (--all: every layer)"
    assert [ln.split()[1] for ln in out[3:6]] == ["conv", "dw", "up"]  # header, then the largest MACs first
    assert out[6] == "by op type"
    conv = next(ln for ln in out if ln.startswith("Conv "))
    assert conv.split()[:5] == ["Conv", "2", "304", "155.65k", "0"]  # 2 layers, params, MACs, ops

    r = analyze(project, "--all", "--json", "out/analysis.json")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert out[1] == "every layer, in graph order"
    assert [ln.split()[1] for ln in out[3:12]] == list(EXPECTED)
    written = json.loads((project / "out" / "analysis.json").read_text())
    assert len(written["layers"]) == len(EXPECTED)
    assert "cached" in r.stderr  # the second run reuses the export and optimize stages


@pytest.mark.slow
def test_a_bad_spec_is_one_line_and_writes_nothing(project: Path) -> None:
    spec = json.loads((project / "spec.yaml").read_text())
    spec["model"]["onnx"] = "missing.onnx"
    (project / "bad.yaml").write_text(json.dumps(spec))
    r = analyze(project, spec="bad.yaml")
    assert r.returncode == 2
    assert lines(r.stderr) == [f"edgeship: error: bad.yaml: field 'model.onnx': file 'missing.onnx' not found; "
                               f"paths are relative to the spec file ({project})"]
    assert r.stdout == "" and not (project / "build").exists() and not (project / "home").exists()


def test_an_op_type_the_counter_does_not_know_is_reported_not_guessed(tmp_path: Path) -> None:
    """GlobalMaxPool and Mish have no profiler in onnx-tool 1.0.1 (and stop its own shape
    inference): they are 'counted: false', the layers around them are counted on ONNX's shapes."""
    from pipeline.analyze import analysis_document

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Mish", ["c"], ["m"]),
             helper.make_node("GlobalMaxPool", ["m"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [_init(rng, "w", [8, 3, 3, 3]), _init(rng, "wf", [10, 8])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    doc = analysis_document(path, {"x": [2, 3, 8, 8]})
    rows = [(r["name"], r["counted"], r["macs"], r["ops"]) for r in doc["layers"]]
    assert rows == [("Conv_0", True, 2 * 8 * 8 * 8 * 27, 0), ("Mish_1", False, 0, 0),
                    ("GlobalMaxPool_2", False, 0, 0), ("Flatten_3", True, 0, 0), ("Gemm_4", True, 2 * 10 * 8, 0)]
    assert doc["layers"][2]["outputs"][0]["shape"] == [2, 8, 1, 1]
    assert doc["totals"]["uncounted_ops"] == ["GlobalMaxPool", "Mish"]
