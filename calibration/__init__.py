"""edgeship's post-training INT8 calibration library.

Calibrate once, on real data, and give every backend the same ranges:

>>> from calibration import CalibrationSet, CalibrationConfig, quantize_onnx
>>> report = quantize_onnx(fp32_onnx, out_onnx, calib, CalibrationConfig(method="auto"), cache_dir)

Importing this package is cheap: numpy only. torch, onnx and onnxruntime are imported inside
the functions that need them, so the pipeline's light core can import it freely.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from calibration.errors import CalibrationConfigError, CalibrationDataError, CalibrationError

if TYPE_CHECKING:
    from calibration.api import build_plan, quantize_onnx
    from calibration.config import CalibrationConfig
    from calibration.data import CalibrationSet, ImagePreprocess, check_overlap
    from calibration.debug import per_layer_sqnr
    from calibration.observers import compute_ranges, qparams, weight_qparams
    from calibration.search import SearchReport, search
    from calibration.stats import Statistics, collect_statistics

# name -> module; resolved on first attribute access (PEP 562) so nothing heavy loads early
_LAZY = {
    "CalibrationSet": "calibration.data",
    "ImagePreprocess": "calibration.data",
    "check_overlap": "calibration.data",
    "CalibrationConfig": "calibration.config",
    "SearchReport": "calibration.search",
    "search": "calibration.search",
    "collect_statistics": "calibration.stats",
    "Statistics": "calibration.stats",
    "compute_ranges": "calibration.observers",
    "qparams": "calibration.observers",
    "weight_qparams": "calibration.observers",
    "quantize_onnx": "calibration.api",
    "build_plan": "calibration.api",
    "per_layer_sqnr": "calibration.debug",
}

__all__ = [
    "CalibrationConfigError",
    "CalibrationDataError",
    "CalibrationError",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'calibration' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
