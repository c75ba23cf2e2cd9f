"""Fixtures: tiny ONNX models built in code, and their calibration data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from calib_models import build_cnn  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cnn(tmp_path_factory.mktemp("models") / "tiny_cnn.onnx")


@pytest.fixture(scope="session")
def calib_samples() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
