"""Real TensorRT engines (fp32, fp16, int8 from edgeship's QDQ), built by the agent's device-side
step and measured by the agent, where ``tensorrt`` and an NVIDIA GPU exist; skipped with that
reason elsewhere. The same release any host builds for a Jetson (no TensorRT needed to build it)
is run here the way a board runs it: ``python -m edgeship_agent run`` in the release folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.tensorrt, pytest.mark.gpu]


def _gpu_reason() -> str | None:
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin is None:  # None origin: only this tests/tensorrt folder, as a namespace
        return "python package 'tensorrt' is not installed (needs an NVIDIA GPU and TensorRT)"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the TensorRT runner uses its CUDA tensors)"
    from pipeline.agent.device_build import Unavailable
    from pipeline.agent.trt_build import gpu_identity

    try:
        gpu_identity()
    except Unavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _gpu_reason()
    if reason:
        pytest.skip(f"no TensorRT engine can be built here: {reason}")
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import load_spec, load_target

    tmp = tmp_path_factory.mktemp("trt")
    (tmp / "trt.yaml").write_text(yaml.safe_dump({
        "name": "trt-gpu", "extends": "local", "transport": {"kind": "local", "root": str(tmp / "device")},
        "builds": [{"backend": "tensorrt", "precisions": ["fp32", "fp16", "int8"], "options": {"workspace_mb": 512}}],
        "validation": {"warmup": 5, "runs": 20, "samples": 500}}))
    return build(load_spec(ROOT / "examples" / "mnist.yaml"), load_target(str(tmp / "trt.yaml")), tmp / "out",
                 cache=Cache(tmp / "stages"), log=lambda _m: None).release_dir


def _run(release: Path, device: Path) -> dict:
    env = {**os.environ, "EDGESHIP_DEVICE_ROOT": str(device), "PYTHONPATH": str(release)}
    proc = subprocess.run([sys.executable, "-m", "edgeship_agent", "run", "--release", "."], cwd=release, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_engines_built_measured_and_cached(release: Path, tmp_path: Path) -> None:
    reference = json.loads((release / "manifest.json").read_text())["provenance"]["reference"]["accuracy"]
    first = {r["id"]: r for r in _run(release, tmp_path / "device")["results"]}
    assert set(first) == {"tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"}
    for rid, r in first.items():
        assert r["error"] is None, r["error"]
        assert r["device_build"]["cached"] is False and r["device_build"]["layers"]
        assert r["accuracy"] >= reference - (0.5 if rid != "tensorrt-int8" else 1.0)
    assert "int8" in first["tensorrt-int8"]["device_build"]["precisions"]  # explicit quantization took
    assert "fp16" in first["tensorrt-fp16"]["device_build"]["precisions"]
    engine = Path(first["tensorrt-int8"]["device_build"]["path"])
    stamp = (engine.read_bytes(), engine.stat().st_mtime_ns)
    again = {r["id"]: r for r in _run(release, tmp_path / "device")["results"]}
    assert all(r["device_build"]["cached"] for r in again.values())
    assert (engine.read_bytes(), engine.stat().st_mtime_ns) == stamp
