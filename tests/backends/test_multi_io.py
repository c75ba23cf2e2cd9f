"""Several inputs and several outputs through the whole build (issue 13's contract): the spec's
``inputs:`` and ``outputs:``, a python source returning a dict of inputs, the export checking every
output against PyTorch, the optimize stage keeping the names, each backend converting and checking
every output by name with the device's runner, and the release shipping every input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

HERE = Path(__file__).resolve().parent
IMAGE = {"name": "image", "shape": [1, 1, 8, 8]}
EXTRA = {"name": "extra", "shape": [1, 4], "layout": "NC"}


def write_spec(tmp: Path, name: str, **fields: Any) -> Path:
    """A spec beside a copy of multi_io.py as usermodel.py (imported from the spec's folder, as a user's
    module is)."""
    shutil.copyfile(HERE / "multi_io.py", tmp / "usermodel.py")
    spec = {"name": name, **fields}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def two_input_spec(tmp: Path) -> Path:
    return write_spec(tmp, "two-inputs", model={"factory": "usermodel:two_inputs"}, inputs=[IMAGE, EXTRA],
                      calibration={"source": {"kind": "python", "callable": "usermodel:two_input_data",
                                              "kwargs": {"n": 40, "seed": 1}}},
                      evaluation={"source": {"kind": "python", "callable": "usermodel:two_input_data",
                                             "kwargs": {"n": 24, "seed": 2}}})


def three_output_spec(tmp: Path, outputs: list[str] | None = None) -> Path:
    fields: dict[str, Any] = {"model": {"factory": "usermodel:three_outputs"}, "input": IMAGE}
    if outputs is not None:
        fields["outputs"] = outputs
    return write_spec(tmp, "three-outputs", **fields,
                      calibration={"source": {"kind": "python", "callable": "usermodel:three_output_data",
                                              "kwargs": {"n": 64, "seed": 1}}},
                      evaluation={"source": {"kind": "python", "callable": "usermodel:three_output_data",
                                             "kwargs": {"n": 24, "seed": 2}}, "metric": "fidelity"})


def build_on(backend: str, spec_path: Path, tmp: Path, precisions: list[str]) -> Any:
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import BuildSpec, load_spec, load_target

    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend=backend, precisions=precisions)]
    return build(load_spec(spec_path), target, tmp / "out", cache=Cache(tmp / "cache"), log=lambda s: None)


def torch_reference(factory: str, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    import multi_io

    from pipeline.stages.export import torch_outputs

    return torch_outputs(getattr(multi_io, factory)(), list(x.values()))


BACKENDS = ["onnxruntime", "tflite", "ncnn"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_inputs_build(tmp_path: Path, backend: str) -> None:
    from pipeline.backends.checks import run_runner_all

    result = build_on(backend, two_input_spec(tmp_path), tmp_path, ["fp32", "fp16"])
    data = result.release_dir / "data"
    x = {"image": np.load(data / "x.npy"), "extra": np.load(data / "x_1.npy")}
    assert x["image"].shape == (24, 1, 8, 8) and x["extra"].shape == (24, 4)
    assert result.manifest["agent"]["inputs"] == ["image", "extra"]
    (want,) = torch_reference("two_inputs", x)
    for art in result.artifacts:
        assert art.runner_config["inputs"] == ["image", "extra"]
        got = run_runner_all(art.runner, art.workdir, art.runner_config, x, 1)
        np.testing.assert_allclose(got["output"], want, rtol=2e-2, atol=2e-2)
        assert art.info["check"]["rel_diff"] < (1e-3 if art.precision == "fp32" else 2e-2)
    # the extras are a real input: without them the model answers otherwise
    art = result.artifacts[0]
    zeroed = run_runner_all(art.runner, art.workdir, art.runner_config, {**x, "extra": 0 * x["extra"]}, 1)
    assert not np.allclose(zeroed["output"], want, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_outputs_named_by_the_spec(tmp_path: Path, backend: str) -> None:
    from pipeline.backends.checks import run_runner_all

    names = ["scores", "heat", "emb"]
    result = build_on(backend, three_output_spec(tmp_path, names), tmp_path, ["fp32", "int8"])
    x = np.load(result.release_dir / "data" / "x.npy")
    want = dict(zip(names, torch_reference("three_outputs", {"image": x})))
    for art in result.artifacts:
        assert art.runner_config["outputs"] == names
        got = run_runner_all(art.runner, art.workdir, art.runner_config, x, 1)
        assert list(got) == names and got["heat"].shape == (24, 2, 8, 8) and got["emb"].shape == (24, 3)
        check = art.info["check"]
        assert set(check["outputs"]) == set(names)  # every output held to the thresholds
        assert "top1_agreement" in check["outputs"]["scores"] and "top1_agreement" not in check["outputs"]["heat"]
        if art.precision == "fp32":
            for name in names:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4)
        else:
            assert check["sqnr_db"] == min(o["sqnr_db"] for o in check["outputs"].values())


def test_dict_output_keys_name_the_outputs(tmp_path: Path) -> None:
    import onnx

    from pipeline.spec import load_spec
    from pipeline.stages.export import export_onnx
    from pipeline.stages.inputs import load_samples, model_loader

    spec = load_spec(three_output_spec(tmp_path))
    calib = load_samples(spec, "calibration")
    art = export_onnx(spec, model_loader(spec), calib.x, tmp_path)
    assert art.output_names == ["logits", "heatmap", "embedding"]
    assert [o.name for o in onnx.load(str(art.path)).graph.output] == art.output_names


def test_outputs_that_do_not_match_the_model_are_one_line(tmp_path: Path) -> None:
    from pipeline.errors import SpecError
    from pipeline.spec import load_spec
    from pipeline.stages.export import export_onnx
    from pipeline.stages.inputs import load_samples, model_loader

    spec = load_spec(three_output_spec(tmp_path, ["boxes", "scores"]))
    calib = load_samples(spec, "calibration")
    with pytest.raises(SpecError, match=r"field 'outputs': names 2 outputs \(boxes, scores\), the model returns 3"):
        export_onnx(spec, model_loader(spec), calib.x, tmp_path)


def test_two_inputs_samples_keyed_by_input_name(tmp_path: Path) -> None:
    from pipeline.errors import SpecError
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import load_samples

    spec = load_spec(two_input_spec(tmp_path))
    samples = load_samples(spec, "evaluation")
    assert list(samples.x) == ["image", "extra"] and len(samples) == 24
    assert samples.y.dtype == np.int64
    spec.inputs[1].name = "extras"
    with pytest.raises(SpecError, match=r"data has inputs \['extra', 'image'\], the model takes \['image', 'extras'\]"):
        load_samples(spec, "evaluation")


def test_npz_holds_one_array_per_input_name(tmp_path: Path) -> None:
    import multi_io

    from pipeline.spec import NpzSource, load_spec
    from pipeline.stages.inputs import load_samples

    spec = load_spec(two_input_spec(tmp_path))
    x, y = multi_io.two_input_data(10, seed=5)
    np.savez(tmp_path / "eval.npz", image=x["image"], extra=x["extra"], y=y)
    spec.evaluation.source = NpzSource(kind="npz", path=str(tmp_path / "eval.npz"))
    samples = load_samples(spec, "evaluation")
    np.testing.assert_array_equal(samples.x["extra"], x["extra"])
    np.testing.assert_array_equal(samples.y, y)


@pytest.mark.parametrize("fields, message", [
    ({}, "give 'input' (the model's input: name, shape) or 'inputs' (a list of them)"),
    ({"inputs": [IMAGE, {**EXTRA, "name": "image"}]}, "inputs name 'image' twice"),
    ({"inputs": [IMAGE, {**EXTRA, "shape": [2, 4]}]}, "input 'extra' has batch 2 (static), input 'image' 1"),
    ({"input": IMAGE, "inputs": [EXTRA]}, "give 'input' (one input) or 'inputs' (several), not both"),
    ({"input": IMAGE, "outputs": ["boxes", "boxes"]}, "outputs names 'boxes' twice"),
])
def test_inputs_and_outputs_refused_in_one_line(tmp_path: Path, fields: dict, message: str) -> None:
    from pipeline.errors import SpecError
    from pipeline.spec import load_spec

    src = {"source": {"kind": "python", "callable": "usermodel:three_output_data"}}
    path = write_spec(tmp_path, "bad", model={"factory": "usermodel:three_outputs"}, calibration=src,
                      evaluation=src, **fields)
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        load_spec(path)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@pytest.mark.slow
def test_int8_of_two_inputs_is_refused_in_one_line(tmp_path: Path) -> None:
    from pipeline.errors import ConversionError

    with pytest.raises(ConversionError, match=r"INT8 calibration takes a model with one input; this one has 2 "
                                              r"\(image, extra\): build it at fp32 or fp16") as err:
        build_on("onnxruntime", two_input_spec(tmp_path), tmp_path, ["int8"])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_two_inputs_tensorrt_host_side_and_profiles_per_input(tmp_path: Path) -> None:
    """The host's half of a TensorRT build (the ONNX shipped, checked with ONNX Runtime) names every
    input; the device's trtexec gets a batch profile for each of them."""
    from pipeline.agent.trt_build import _trtexec_args

    result = build_on("tensorrt", two_input_spec(tmp_path), tmp_path, ["fp16"])
    (art,) = result.artifacts
    cfg = art.runner_config
    assert cfg["inputs"] == ["image", "extra"] and cfg["outputs"] == ["output"]
    assert cfg["input_shapes"] == {"image": [1, 1, 8, 8], "extra": [1, 4]}
    profile = {"options": {"profile": {"min": 1, "opt": 2, "max": 4}}}
    args = _trtexec_args("trtexec", Path("m.onnx"), tmp_path / "e.plan",
                         {**cfg, "device_build": {**cfg["device_build"], **profile}})
    assert "--maxShapes=image:4x1x8x8,extra:4x4" in args and "--minShapes=image:1x1x8x8,extra:1x4" in args
