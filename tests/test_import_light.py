"""`import pipeline` (and the light core) must not import torch, onnxruntime or other heavy stacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "onnx", "tensorflow", "jax", "litert_torch", "ai_edge_litert", "ncnn", "pnnx",
         "fabric", "paramiko", "matplotlib", "scipy")
LIGHT_MODULES = ["pipeline", "pipeline.spec", "pipeline.errors", "pipeline.registry", "pipeline.cli",
                 "pipeline.cache", "pipeline.build", "pipeline.deploy", "pipeline.validate.gate",
                 "pipeline.validate.report", "pipeline.validate.stats", "pipeline.validate.html",
                 "pipeline.validate.junit", "pipeline.validate.paired", "pipeline.validate.baseline",
                 "pipeline.nightly", "pipeline.backends.onnxruntime.convert", "pipeline.agent",
                 "calibration"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_module_import_is_light(module: str) -> None:
    code = (f"import sys, {module}\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"


def test_registered_backends_import_lightly() -> None:
    from pipeline.registry import BACKENDS

    for name, path in BACKENDS.items():
        module = path.split(":")[0]
        code = (f"import sys, importlib.util\n"
                f"try: spec = importlib.util.find_spec({module!r})\n"
                f"except ModuleNotFoundError: spec = None\n"
                f"if spec is None: print('MISSING'); raise SystemExit\n"
                f"import {module}\n"
                f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if out.stdout.strip() == "MISSING":
            continue  # the registry guard test reports missing backends
        assert out.stdout.strip() == "", f"importing backend {name} pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("backend", ["tflite", "ncnn"])
def test_backend_probe_and_runner_import_lightly(backend: str) -> None:
    """available() / version() (what `edgeship targets` calls) and the device runner stay light."""
    code = (f"import sys, pipeline.backends.{backend}.convert as c, pipeline.agent.runners.{backend}\n"
            "c.BACKEND.available(); c.BACKEND.version()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"probing backend {backend} pulled in: {out.stdout.strip()}"
