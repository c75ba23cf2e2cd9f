"""The one explicit registry of backends, imported lazily by module path.

No ``__subclasses__`` discovery and no import-time side effects: adding a runtime means adding
a line here, a package under pipeline/backends and a runner under pipeline/agent/runners.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.errors import BackendUnavailable, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import Backend

# name -> "module:attribute" of an object implementing pipeline.backends.base.Backend
BACKENDS: dict[str, str] = {
    "onnxruntime": "pipeline.backends.onnxruntime.convert:BACKEND",
    "tflite": "pipeline.backends.tflite.convert:BACKEND",
    "ncnn": "pipeline.backends.ncnn.convert:BACKEND",
    "tensorrt": "pipeline.backends.tensorrt.convert:BACKEND",
}

# Backends that convert from the PyTorch module (``ctx.torch_model()``), not from the ONNX file: a
# spec that starts from ``model.onnx`` cannot use them (checked before a build starts).
NEEDS_PYTORCH: frozenset[str] = frozenset({"tflite"})


@lru_cache(maxsize=None)
def get_backend(name: str) -> "Backend":
    """The backend object registered under ``name``."""
    try:
        path = BACKENDS[name]
    except KeyError:
        raise SpecError(f"unknown backend {name!r}; registered: {', '.join(sorted(BACKENDS))}") from None
    module_name, attr = path.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def require_available(names: list[str]) -> None:
    """Fail before any work starts if a listed backend cannot run here."""
    for name in names:
        ok, reason = get_backend(name).available()
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available on this host: {reason}")
