"""Calibration data for the TFLite route (litert-torch calibrates from the PyTorch model).

The TFLite converter runs its own observers on the samples, so what we hand over is the exact
sample array (``.npy``, float32, N x input shape) and its manifest, so that TFLite is
calibrated on the same samples as every other backend and the manifest proves it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.data import CalibrationSet


def write_tflite_calibration(out_dir: Path, calib: CalibrationSet, name: str = "calibration") -> tuple[Path, Path]:
    """Write ``<name>.npy`` (samples) and ``<name>.manifest.json`` under ``out_dir``.

    Returns:
        (samples path, manifest path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npy = out_dir / f"{name}.npy"
    tmp = out_dir / f".{name}.tmp.npy"
    np.save(tmp, np.ascontiguousarray(calib.samples, np.float32))
    tmp.replace(npy)  # atomic: a reader never sees a half-written array
    manifest = calib.write_manifest(out_dir / f"{name}.manifest.json")
    return npy, manifest
