"""The TFLite runner on `tflite_runtime` (what Raspberry Pi images often ship), not ai_edge_litert.

tflite-runtime 2.14 was built for numpy 1.x, so it gets its own virtual environment with
``numpy<2``, as on such a device; the device agent from a real release runs there and must give
the same accuracy as with ai_edge_litert.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.spec import BuildSpec, load_target

pytestmark = [pytest.mark.slow, pytest.mark.backend("tflite")]


@pytest.fixture(scope="module")
def tflite_runtime_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("tfrt") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "tflite-runtime==2.14.0", "numpy<2"],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"cannot install tflite-runtime 2.14 with numpy<2 here: {pip.stderr.strip().splitlines()[-1:]}")
    return venv / "bin" / "python"


def test_agent_on_tflite_runtime_matches_ai_edge_litert(tmp_path: Path, mnist_spec: Any,
                                                          tflite_runtime_python: Path) -> None:
    from pipeline.build import build
    from pipeline.cache import Cache

    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend="tflite", precisions=["fp32", "int8"])]
    target.validation.runs = 5
    result = build(mnist_spec, target, tmp_path / "out", cache=Cache(tmp_path / "cache"), log=lambda m: None)

    def agent(python: str) -> dict[str, Any]:
        proc = subprocess.run([python, "-m", "edgeship_agent", "run", "--release", "."], cwd=result.release_dir,
                              capture_output=True, text=True, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(result.release_dir)})
        assert proc.returncode == 0, proc.stderr
        return {r["id"]: r for r in json.loads(proc.stdout)["results"]}

    on_runtime = agent(str(tflite_runtime_python))
    on_litert = agent(sys.executable)
    for rid, row in on_runtime.items():
        assert row["error"] is None and row["runtime_version"].startswith("tflite-runtime 2.14"), row
        assert on_litert[rid]["runtime_version"].startswith("ai-edge-litert")
        assert abs(row["accuracy"] - on_litert[rid]["accuracy"]) <= 0.2, (rid, row["accuracy"], on_litert[rid]["accuracy"])
        assert row["accuracy"] > 97.0
