"""The host's half of a device-side build: a Jetson target builds here without TensorRT or a GPU,
the release carries what the board builds from, and deploy's --backend / --skip-unavailable pick
builds without editing YAML."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.cache import sha256_file
from pipeline.errors import BackendUnavailable, SpecError
from pipeline.registry import BACKENDS, builds_on_device, select_builds
from pipeline.spec import BuildSpec, load_target
from tests.deploy.cli import EDGESHIP, MNIST, env_for, last_line

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def test_jetson_release_builds_on_a_host_without_tensorrt(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from calibration.writers.tensorrt import check_tensorrt_rules, read_calibration_cache

    proc = subprocess.run([str(EDGESHIP), "build", "--spec", str(MNIST), "--target", "jetson", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env=env_for(tmp_path, tmp_path / "stages"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    release = tmp_path / "out" / "release"
    runs = {r["id"]: r for r in json.loads((release / "manifest.json").read_text())["runs"]}
    assert set(runs) == {"tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8", "onnxruntime-fp32", "onnxruntime-int8"}
    for rid in ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"):
        cfg, folder = runs[rid]["config"], release / runs[rid]["dir"]
        assert cfg["device_build"]["artifact"] == "model.engine" and not (folder / "model.engine").exists()
        assert cfg["device_build"]["onnx_sha256"] == sha256_file(folder / cfg["onnx"])  # the cache key's input
    int8 = release / runs["tensorrt-int8"]["dir"]
    check_tensorrt_rules(int8 / "model.qdq.onnx")  # explicit quantization, as TensorRT wants it
    header, scales = read_calibration_cache(int8 / "calibration.cache")
    graph = onnx.load(str(int8 / "model.qdq.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = {n.input[0]: float(inits[n.input[1]]) for n in graph.node
           if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert header.startswith("TRT-") and set(scales) == set(qdq)  # the same ranges, for implicit INT8
    assert np.allclose([scales[k] for k in qdq], list(qdq.values()), rtol=1e-6)
    check = runs["tensorrt-int8"]["conversion"]["check"]
    assert "onnxruntime on the shipped ONNX" in check["runtime"]
    # the shipped QDQ model reproduces the search's holdout accuracy (MNIST's labels: top-1)
    assert check["metric"]["name"] == "accuracy" and check["metric"]["value"] == check["metric"]["search"]
    assert not runs["onnxruntime-fp32"]["config"].get("device_build")  # ONNX Runtime only when opted in


def test_which_builds_are_finished_on_the_device() -> None:
    assert builds_on_device(BuildSpec(backend="tensorrt"))
    assert builds_on_device(BuildSpec(backend="onnxruntime", options={"optimize_on_device": True}))
    assert not builds_on_device(BuildSpec(backend="onnxruntime"))
    assert not any(builds_on_device(BuildSpec(backend=b)) for b in ("tflite", "ncnn"))


def test_deploy_backend_flag_picks_builds(tmp_path: Path) -> None:
    jetson = load_target("jetson")
    only = select_builds(jetson, ["onnxruntime"], False, log=lambda _m: None)
    assert [b.backend for b in only.builds] == ["onnxruntime"] and len(jetson.builds) == 2
    with pytest.raises(SpecError, match=r"--backend ncnn: target jetson has no ncnn build; its builds: "
                                        r"onnxruntime, tensorrt"):
        select_builds(jetson, ["ncnn"], False)
    # through the console script: a usage mistake is bad input (exit 2), before any work
    proc = subprocess.run([str(EDGESHIP), "deploy", "--spec", str(MNIST), "--target", "jetson", "--backend",
                           "nosuch", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env_for(tmp_path, tmp_path / "stages"), timeout=120)
    assert proc.returncode == 2 and "unknown backend 'nosuch'" in last_line(proc.stderr)
    assert not (tmp_path / "out" / "release").exists()


class _NoConverterHere:
    """A test-only backend whose converter is missing on this host (the registry's contract)."""

    name = "no-converter"
    precisions = ("fp32",)

    def available(self) -> tuple[bool, str]:
        return False, "its converter is not installed on this host"

    def device_build(self, options: dict[str, Any]) -> bool:
        return False


BACKEND = _NoConverterHere()


def test_skip_unavailable_drops_builds_the_host_cannot_convert(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    import pipeline.spec

    monkeypatch.setitem(BACKENDS, "no-converter", f"{__name__}:BACKEND")  # registered for this test only
    monkeypatch.setattr(pipeline.spec, "BACKENDS", (*pipeline.spec.BACKENDS, "no-converter"))
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "extends": "local", "builds": [
        {"backend": "no-converter", "precisions": ["fp32"]}, {"backend": "onnxruntime", "precisions": ["fp32"]}]}))
    target = load_target(str(path))
    said: list[str] = []
    kept = select_builds(target, None, True, log=said.append)
    assert [b.backend for b in kept.builds] == ["onnxruntime"]
    assert said == ["skipped no-converter: not available on this host: its converter is not installed on this host"]
    assert select_builds(target, None, False) is target  # without the flag the build is refused later, as before
    with pytest.raises(BackendUnavailable, match="skipped them all"):
        select_builds(target, ["no-converter"], True, log=said.append)
