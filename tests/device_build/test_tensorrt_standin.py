"""The device-side TensorRT build, orchestrated for real against STAND-INS of TensorRT (see
standin.py): the release is built on this host without TensorRT, then the agent runs exactly as
on a board (``python -m edgeship_agent build`` in the release folder, EDGESHIP_DEVICE_ROOT set),
with the stand-in ``tensorrt`` package, ``trtexec`` and ``libcuda.so.1`` on its paths."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.device_build import standin

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"workspace_mb": 256, "dla_core": 1, "profile": {"min": 1, "opt": 4, "max": 8}}
pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jetson-like release (TensorRT fp32, fp16, int8 with builder options), built on this host,
    which has no TensorRT and no GPU; the spec's batch is dynamic so the profile applies."""
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_spec, load_target

    tmp = tmp_path_factory.mktemp("trt-release")
    spec_data = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
    spec_data["input"]["batch"] = "dynamic"
    spec_data["evaluation"]["limit"] = 64
    (tmp / "mnist-dyn.yaml").write_text(yaml.safe_dump(spec_data))
    (tmp / "trt-standin.yaml").write_text(yaml.safe_dump({
        "name": "trt-standin", "extends": "local", "transport": {"kind": "local", "root": str(tmp / "device")},
        "builds": [{"backend": "tensorrt", "precisions": ["fp32", "fp16", "int8"], "options": OPTIONS}]}))
    result = build(load_spec(tmp / "mnist-dyn.yaml"), load_target(str(tmp / "trt-standin.yaml")), tmp / "out",
                   cache=Cache(tmp / "stages"), log=lambda _m: None)
    return result.release_dir


def _agent(release: Path, device: Path, env_extra: dict[str, str], *args: str) -> dict[str, Any]:
    """The agent as the transport starts it: cwd and PYTHONPATH the release, the root exported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    env.update({"EDGESHIP_DEVICE_ROOT": str(device), "PATH": os.environ["PATH"]}, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(release), env_extra.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "edgeship_agent", *args, "--release", "."], cwd=release,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture
def standins(tmp_path: Path) -> dict[str, str]:
    libcuda = standin.write_libcuda(tmp_path / "lib")
    if libcuda is None:
        pytest.skip("no C compiler to build the stand-in libcuda.so.1")
    return {"PYTHONPATH": str(standin.write_tensorrt(tmp_path / "py")), "LD_LIBRARY_PATH": str(libcuda),
            "STANDIN_TRT_RECORD": str(tmp_path / "record.jsonl")}


def test_python_api_build_flags_cache_and_inspector(release: Path, tmp_path: Path, standins: dict[str, str]) -> None:
    device = tmp_path / "device"
    out = _agent(release, device, standins, "build")["builds"]
    assert set(out) == {"tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"}
    builds = [r for r in _records(Path(standins["STANDIN_TRT_RECORD"])) if r["event"] == "build"]
    parsed = [Path(r["path"]).name for r in _records(Path(standins["STANDIN_TRT_RECORD"])) if r["event"] == "parse"]
    assert sorted(parsed) == ["model.onnx", "model.onnx", "model.qdq.onnx"]  # int8 builds from our QDQ
    assert sorted(tuple(b["flags"]) for b in builds) == [
        ("FP16", "GPU_FALLBACK"), ("GPU_FALLBACK",), ("GPU_FALLBACK", "INT8")]
    for b in builds:  # the target's builds[].options, as TensorRT builder settings
        assert b["pools"] == {"WORKSPACE": 256 << 20} and b["device"] == "DLA" and b["dla_core"] == 1
        assert b["profiles"] == [{"input": [[1, 1, 28, 28], [4, 1, 28, 28], [8, 1, 28, 28]]}]
        assert b["verbosity"] == "DETAILED"
    int8 = out["tensorrt-int8"]
    assert int8["cached"] is False and int8["identity"] == {
        "tensorrt": "10.3.0", "gpu": standin.STANDIN_GPU, "compute_capability": standin.STANDIN_CC}
    assert int8["precisions"] == {"int8": 2} and out["tensorrt-fp16"]["precisions"] == {"fp16": 2}
    assert any("engine built" in ln for ln in int8["log_tail"]) and int8["seconds"] >= 0
    engine = Path(int8["path"])
    assert engine == device / "engines" / int8["key"] / "model.engine" and engine.is_file()
    assert (engine.parent / "build.log").read_text().strip()
    assert len({b["key"] for b in out.values()}) == 3  # precision is part of the key

    # Redeploy: nothing is built; the engine file is the same bytes with the same mtime.
    before = _digest(engine)
    again = _agent(release, device, standins, "build")["builds"]
    assert all(b["cached"] for b in again.values()) and again["tensorrt-int8"]["key"] == int8["key"]
    assert _digest(engine) == before
    assert len([r for r in _records(Path(standins["STANDIN_TRT_RECORD"])) if r["event"] == "build"]) == 3

    # Another TensorRT version on the board: another key, a new engine.
    newer = _agent(release, device, {**standins, "STANDIN_TRT_VERSION": "10.4.0"}, "build", "--only",
                   "tensorrt-int8")["builds"]["tensorrt-int8"]
    assert newer["cached"] is False and newer["key"] != int8["key"] and newer["identity"]["tensorrt"] == "10.4.0"


def test_trtexec_build_where_only_trtexec_exists(release: Path, tmp_path: Path, standins: dict[str, str]) -> None:
    env = {"LD_LIBRARY_PATH": standins["LD_LIBRARY_PATH"], "STANDIN_TRT_RECORD": standins["STANDIN_TRT_RECORD"],
           "PATH": f"{standin.write_trtexec(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"}
    out = _agent(release, tmp_path / "device", env, "build", "--only", "tensorrt-fp16", "--only", "tensorrt-int8")
    fp16, int8 = out["builds"]["tensorrt-fp16"], out["builds"]["tensorrt-int8"]
    assert fp16["builder"].startswith("trtexec") and fp16["identity"]["tensorrt"] == "10.3.0"
    argv = {Path(a.split("=", 1)[1]).name if a.startswith("--onnx=") else a: a
            for r in _records(Path(env["STANDIN_TRT_RECORD"])) if r["event"] == "trtexec" for a in r["argv"]}
    for flag in ("--fp16", "--int8", "--skipInference", "--profilingVerbosity=detailed", "--useDLACore=1",
                 "--allowGPUFallback", "--memPoolSize=workspace:256M", "--minShapes=input:1x1x28x28",
                 "--optShapes=input:4x1x28x28", "--maxShapes=input:8x1x28x28", "model.qdq.onnx"):
        assert flag in argv, flag
    assert int8["precisions"] == {"int8": 1} and "PASSED" in "\n".join(int8["log_tail"])


def test_no_tensorrt_fails_each_run_naming_the_host(release: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no tensorrt module, no trtexec
    out = _agent(release, tmp_path / "device", env, "build")["builds"]
    for rid in ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"):
        assert out[rid]["error"] == (f"tensorrt is not installed on {socket.gethostname()} (python {sys.executable}); "
                                     "JetPack 6 ships it (python3-libnvinfer: make the runtime venv with "
                                     "--system-site-packages)")
    assert not (tmp_path / "device" / "engines").exists() or not any((tmp_path / "device" / "engines").iterdir())
