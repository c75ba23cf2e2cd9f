"""The one explicit registry of backends, imported lazily by module path.

No ``__subclasses__`` discovery and no import-time side effects: adding a runtime means adding
a line here, a package under pipeline/backends and a runner under pipeline/agent/runners.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from pipeline.errors import BackendUnavailable, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import Backend
    from pipeline.spec import BuildSpec, TargetSpec

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


def builds_on_device(build: "BuildSpec") -> bool:
    """Whether this build's artifact is finished on the device (TensorRT; ONNX Runtime opt-in)."""
    return get_backend(build.backend).device_build(build.options)


def select_builds(target: "TargetSpec", backends: list[str] | None, skip_unavailable: bool,
                  log: Callable[[str], None] = print) -> "TargetSpec":
    """``target`` with only the builds of ``backends`` (``deploy --backend``), and without those
    whose converter cannot run on this host when ``skip_unavailable`` (each skip logged). The
    device's own runtime is never judged here: a device without it fails that run, with its reason.
    """
    builds = list(target.builds)
    if backends:
        listed = {b.backend for b in builds}
        missing = [n for n in backends if n not in listed]
        if missing:
            get_backend(missing[0])  # an unregistered name gets the registry's own error
            raise SpecError(f"--backend {missing[0]}: target {target.name} has no {missing[0]} build; "
                            f"its builds: {', '.join(sorted(listed))}")
        builds = [b for b in builds if b.backend in backends]
    if skip_unavailable:
        kept = []
        for b in builds:
            ok, reason = get_backend(b.backend).available()
            if ok:
                kept.append(b)
            else:
                log(f"skipped {b.backend}: not available on this host: {reason}")
        if not kept:
            raise BackendUnavailable(f"no build of target {target.name} can run on this host "
                                     "(--skip-unavailable skipped them all)")
        builds = kept
    return target if builds == list(target.builds) else target.model_copy(update={"builds": builds})
