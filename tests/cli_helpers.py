"""Shared by the console-script tests (tests/test_cli_*.py): run ``.venv/bin/edgeship`` as a user does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "examples" / "mnist.yaml"
EDGESHIP = Path(sys.executable).with_name("edgeship")  # the console script of this environment

# A data callable and a model that stop (after leaving a mark) where the test wants the interrupt.
SLOW_MODULE = '''
import os, pathlib, time
import torch
from pipeline.workloads import mnist

MARK = pathlib.Path(os.environ["SLOW_MARK"])


def calibration(limit=None):
    MARK.write_text("calibration")
    time.sleep(300)


class SlowNet(torch.nn.Module):
    """The MNIST network whose first forward call (the ONNX export traces it) blocks."""

    def __init__(self):
        super().__init__()
        self.inner = mnist.build_model()

    def forward(self, x):
        if not MARK.exists():
            MARK.write_text("forward")
            time.sleep(300)
        return self.inner(x)


def model():
    return SlowNet()
'''


def sigint_default() -> None:
    """``preexec_fn`` of a child a test interrupts with SIGINT: a suite started in the background by
    a non-interactive shell (``cmd &``) inherits SIGINT ignored, and a Python child that starts with
    it ignored never raises KeyboardInterrupt, so the test would time out instead of testing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def edgeship(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGESHIP), *args], capture_output=True, text=True, env=env, timeout=timeout)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def make_env(tmp_path: Path) -> dict[str, str]:
    """The user's environment with an isolated stage cache and the test's own modules importable."""
    (tmp_path / "slowmod.py").write_text(SLOW_MODULE)
    return {**os.environ, "EDGESHIP_STAGE_CACHE": str(tmp_path / "stages"), "PYTHONPATH": str(tmp_path),
            "SLOW_MARK": str(tmp_path / "mark"), "COLUMNS": "200"}


def cheap_target(tmp_path: Path, name: str = "cheapdev", **extra: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "extends": "local", "name": name, "transport": {"kind": "local", "root": str(tmp_path / "device")},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
        "validation": {"warmup": 1, "runs": 5}, **extra}))
    return path


def spec_with(tmp_path: Path, name: str, **changes: object) -> Path:
    """The MNIST example with ``a__b=value`` fields replaced, written next to the test's files."""
    data = yaml.safe_load(MNIST.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
