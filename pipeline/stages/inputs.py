"""Resolve what a spec names: the PyTorch model and the calibration / evaluation samples."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline.backends.base import Samples
from pipeline.errors import EdgeshipError, InputFileError, SpecError, UserCodeError
from pipeline.spec import DataSource, ImageFolderSource, NpzSource, PipelineSpec, PythonSource

if TYPE_CHECKING:  # pragma: no cover
    from calibration.data import CalibrationSet


def import_callable(ref: str, where: str) -> Callable[..., Any]:
    """``module:function`` -> the function, with a one-line SpecError naming ``where``."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"{where}: cannot import module {module_name!r} ({exc}); "
                        "check the name and that it is on PYTHONPATH") from None
    except Exception as exc:  # the module's own code raised while importing
        raise _user_code_error(where, f"importing {module_name}", exc) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{where}: {module_name!r} has no callable {attr!r}; check the name")
    return fn


def call_user(ref: str, where: str, kwargs: dict[str, Any]) -> Any:
    """Import and call the spec's ``module:function``; what it raises becomes one UserCodeError line."""
    fn = import_callable(ref, where)
    try:
        return fn(**kwargs)
    except EdgeshipError:
        raise
    except Exception as exc:  # user code: any type; KeyboardInterrupt still propagates
        raise _user_code_error(where, ref, exc) from exc


def _user_code_error(where: str, what: str, exc: Exception) -> UserCodeError:
    text = str(exc).strip()
    detail = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return UserCodeError(f"{where}: {what} raised {detail}; fix that code (the spec names it)")


def model_loader(spec: PipelineSpec) -> Callable[[], Any]:
    """A function returning the eval-mode ``nn.Module`` the spec names (lazy: torch on call)."""
    src = spec.model
    factory_where = f"{spec.source_path}: field 'model.factory'"

    def load() -> Any:
        import torch

        if src.exported:
            from pipeline.stages.pt2_guard import load_exported_program

            # An untrusted file: checked and loaded without unpickling arbitrary objects.
            program = load_exported_program(spec.resolve_path(src.exported), "model.exported")
            return program.module()
        model = call_user(src.factory or "", factory_where, src.kwargs)
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"{factory_where}: returned {type(model).__name__}, expected torch.nn.Module")
        if src.checkpoint:
            load_checkpoint(model, spec.resolve_path(src.checkpoint))
        return model.eval()

    return load


def load_checkpoint(model: Any, path: Path, field: str = "model.checkpoint") -> None:
    """Load a state dict with the safe unpickler (weights_only): one line when it is refused or does not fit."""
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError (refused global), a corrupt or truncated file, ...
        raise InputFileError(f"{path}: field '{field}': cannot load it with weights_only=True "
                             f"({_refused_global(exc)}); save only the state_dict (tensors), "
                             "e.g. torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as exc:  # missing / unexpected keys, shape mismatch, not a mapping
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path}: field '{field}': does not fit the factory's module "
                             f"({first[:200]}); give the checkpoint saved from this model") from None


def _refused_global(exc: Exception) -> str:
    """The line of torch's weights_only message that names what was refused (its advice is unsafe)."""
    import re

    named = re.search(r"Unsupported (global|operand)[^.;(]*", str(exc))
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (named.group(0).strip() if named else (lines or [type(exc).__name__])[0])[:200]


def model_identity(spec: PipelineSpec) -> dict[str, Any]:
    """What identifies the model's bytes, for cache keys (weights hash, not just a name)."""
    ident: dict[str, Any] = {"factory": spec.model.factory, "kwargs": spec.model.kwargs}
    for field in ("checkpoint", "exported"):
        value = getattr(spec.model, field)
        if value:
            from pipeline.cache import sha256_file

            ident[field] = sha256_file(spec.resolve_path(value))
    return ident


def state_hash(model: Any) -> str:
    """sha256 over a module's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def load_samples(spec: PipelineSpec, section: str) -> Samples:
    """The calibration or evaluation samples, shape-checked against the spec's input."""
    from calibration.errors import CalibrationDataError

    cfg = getattr(spec, section)
    where = f"{spec.source_path}: field '{section}.source'"
    expected = tuple(spec.input.shape[1:])
    try:
        data = _read_source(spec, cfg.source, where, expected, cfg.limit)
    except CalibrationDataError as exc:
        raise InputFileError(f"{where} ({source_name(spec, cfg.source)}): {exc}") from None
    if tuple(data.samples.shape[1:]) != expected:
        raise SpecError(f"{where}: samples have shape {tuple(data.samples.shape[1:])}, the model input "
                        f"expects {expected} (input.shape without the batch dim)")
    if cfg.limit:
        data = data.subset(range(min(cfg.limit, len(data))))
    return to_samples(data)


def source_name(spec: PipelineSpec, src: DataSource) -> str:
    """The data source as a user recognises it: the file or folder, or the callable."""
    if isinstance(src, PythonSource):
        return f"callable {src.callable}"
    return str(spec.resolve_path(src.path))


def check_labels(spec: PipelineSpec, reference: np.ndarray, sets: dict[str, Samples]) -> None:
    """Labels of a top-1 metric must be class indices of the model's output (N, C): 0 <= y < C.

    Called once the fp32 reference exists, so C is what the model really outputs. A label outside
    the range can never match, so the gate would compare 0 % with 0 % and pass.
    """
    if spec.evaluation.metric != "top1" or reference.ndim < 2:
        return
    classes = int(np.prod(reference.shape[1:]))
    for section, samples in sets.items():
        if samples.y is None:
            continue
        bad = np.flatnonzero((samples.y < 0) | (samples.y >= classes))
        if bad.size:
            i = int(bad[0])
            src = source_name(spec, getattr(spec, section).source)
            raise InputFileError(
                f"{spec.source_path}: field '{section}.source' ({src}): label {int(samples.y[i])} of sample "
                f"{samples.ids[i]!r} ({bad.size} of {len(samples.y)} labels) is outside the model's "
                f"{classes} classes; labels must be class indices 0..{classes - 1}: fix the labels or the model")


def to_samples(data: "CalibrationSet") -> Samples:
    return Samples(x=data.samples, y=data.labels, ids=list(data.ids), sha256=data.content_hash)


def check_disjoint(calibration: Samples, evaluation: Samples, spec: PipelineSpec) -> None:
    """Refuse a calibration set that shares samples with the evaluation set (by content)."""
    from calibration.data import CalibrationSet, check_overlap
    from calibration.errors import CalibrationDataError

    try:
        check_overlap(CalibrationSet(calibration.x, tuple(calibration.ids)),
                      CalibrationSet(evaluation.x, tuple(evaluation.ids)))
    except CalibrationDataError as exc:
        raise SpecError(f"{spec.source_path}: fields 'calibration' and 'evaluation': {exc}") from None


def _read_python(src: PythonSource, where: str, shape: tuple[int, ...]) -> "CalibrationSet":
    """A ``python`` source: ``callable(**kwargs)`` returns ``x`` or ``(x, labels)``."""
    from calibration.data import CalibrationSet
    from calibration.errors import CalibrationDataError

    out = call_user(src.callable, where, src.kwargs)
    x, y = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise CalibrationDataError(f"{src.callable} returned {type(x).__name__}, not an array of numbers "
                                   f"({exc}); return x or (x, labels) as numpy arrays") from None
    ids = [f"{src.callable}[{i}]" for i in range(len(x))] if x.ndim else None
    return CalibrationSet.from_arrays(x, labels=y, ids=ids, input_shape=shape)


def _read_source(spec: PipelineSpec, src: DataSource, where: str, shape: tuple[int, ...],
                 limit: int | None) -> "CalibrationSet":
    from calibration.data import CalibrationSet, ImagePreprocess

    if isinstance(src, PythonSource):
        return _read_python(src, where[:-1] + ".callable'", shape)
    if isinstance(src, NpzSource):
        return CalibrationSet.from_numpy(spec.resolve_path(src.path), input_shape=shape)
    assert isinstance(src, ImageFolderSource)
    pre = spec.preprocessing
    if spec.input.layout == "NC":
        raise SpecError(f"{where}: image folders need an image input layout (NCHW or NHWC)")
    h, w = (shape[1], shape[2]) if spec.input.layout == "NCHW" else (shape[0], shape[1])
    if pre.resize:
        h, w = pre.resize
    prep = ImagePreprocess(height=h, width=w, mean=tuple(pre.mean), std=tuple(pre.std), scale=pre.scale,
                           layout=spec.input.layout, color=pre.color)
    folder = spec.resolve_path(src.path)
    has_classes = folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
    return CalibrationSet.from_image_folder(folder, prep, labels_from_subfolders=has_classes, limit=limit)
