"""Resolve what a spec names: the PyTorch model and the calibration / evaluation samples."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline.backends.base import Pixels, Samples
from pipeline.errors import EdgeshipError, InputFileError, SpecError, UserCodeError
from pipeline.spec import DataSource, ImageFolderSource, NpzSource, PipelineSpec, PythonSource, TargetSpec

if TYPE_CHECKING:  # pragma: no cover
    from calibration.data import CalibrationSet, FolderLabels, ImagePreprocess


def import_callable(ref: str, where: str, beside: Path | None = None) -> Callable[..., Any]:
    """``module:function`` -> the function, with a one-line SpecError naming ``where``.

    ``beside`` (the spec's folder) is searched after everything else on ``sys.path``, so a
    ``mymodel.py`` next to the spec imports as ``mymodel`` without PYTHONPATH, while edgeship's own
    packages and the standard library are never shadowed by a file there.
    """
    module_name, _, attr = ref.partition(":")
    if beside is not None:
        _search_beside(beside)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"{where}: cannot import module {module_name!r} ({exc}); check the name; a module "
                        "is found beside the spec or on PYTHONPATH") from None
    except Exception as exc:  # the module's own code raised while importing
        raise user_code_error(where, f"importing {module_name}", exc) from exc
    _check_not_shadowed(module, module_name, beside, where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{where}: {module_name!r} has no callable {attr!r}; check the name")
    return fn


_BESIDE: list[Path] = []
"""Spec folders this process appended to sys.path (one at a time)."""


def _search_beside(folder: Path) -> None:
    """Append ``folder`` to sys.path; forget the previous spec's folder and the modules read from it.

    Several specs run in one process (the nightly, tests): a ``mymodel`` of the last spec's folder
    must not answer for this one's.
    """
    folder = folder.resolve()
    for old in [d for d in _BESIDE if d != folder]:
        _BESIDE.remove(old)
        if str(old) in sys.path:
            sys.path.remove(str(old))
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None)
            top = name.split(".")[0]
            if origin and Path(origin).resolve().is_relative_to(old) \
                    and Path(origin).resolve().relative_to(old).parts[0] in (top, f"{top}.py"):
                del sys.modules[name]
    if str(folder) not in sys.path:
        _BESIDE.append(folder)
        sys.path.append(str(folder))
        importlib.invalidate_caches()


def _check_not_shadowed(module: Any, name: str, beside: Path | None, where: str) -> None:
    """A file beside the spec with the name of an installed module would silently not be used."""
    top = name.split(".")[0]
    if beside is None or not ((beside / f"{top}.py").is_file() or (beside / top / "__init__.py").is_file()):
        return
    origin = getattr(sys.modules.get(top), "__file__", None)
    if origin and not Path(origin).resolve().is_relative_to(beside.resolve()):
        raise SpecError(f"{where}: {top!r} beside the spec ({beside}) has the name of another module, "
                        f"{origin}, which is imported instead; rename your file")


def call_user(ref: str, where: str, kwargs: dict[str, Any], beside: Path | None = None) -> Any:
    """Import and call the spec's ``module:function``; what it raises becomes one UserCodeError line."""
    fn = import_callable(ref, where, beside)
    try:
        return fn(**kwargs)
    except EdgeshipError:
        raise
    except Exception as exc:  # user code: any type; KeyboardInterrupt still propagates
        raise user_code_error(where, ref, exc) from exc


def user_code_error(where: str, what: str, exc: Exception) -> UserCodeError:
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
        model = call_user(src.factory or "", factory_where, src.kwargs, spec_folder(spec))
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"{factory_where}: returned {type(model).__name__}, expected torch.nn.Module")
        if src.checkpoint:
            load_checkpoint(model, spec.resolve_path(src.checkpoint))
        return model.eval()

    return load


def spec_folder(spec: PipelineSpec) -> Path | None:
    """The folder of the spec file: modules beside it are importable (:func:`import_callable`)."""
    return spec.source_path.parent if spec.source_path is not None else None


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
    """The calibration or evaluation samples, shape-checked against the spec's inputs.

    One input with class labels (or none) goes through ``CalibrationSet`` (stratified ``limit``,
    image folders); several inputs, or per-sample label objects, through :func:`_dict_samples`.
    """
    from calibration.data import CalibrationSet
    from calibration.errors import CalibrationDataError

    cfg = getattr(spec, section)
    where = f"{spec.source_path}: field '{section}.source'"
    expected = tuple(spec.input.shape[1:])
    try:
        data = _read_source(spec, cfg.source, where, expected, cfg.limit)
        if not isinstance(data, CalibrationSet):
            return _dict_samples(spec, *data, where, cfg.limit)
    except CalibrationDataError as exc:
        raise InputFileError(f"{where} ({source_name(spec, cfg.source)}): {exc}") from None
    if tuple(data.samples.shape[1:]) != expected:
        raise SpecError(f"{where}: samples have shape {tuple(data.samples.shape[1:])}, the model input "
                        f"expects {expected} (input.shape without the batch dim)")
    if cfg.limit and cfg.limit < len(data):  # image folders pick theirs before decoding
        from calibration.data import pick_subset

        data = data.subset(pick_subset(data.labels, len(data), cfg.limit))
    recipe = image_preprocess(spec).recipe() if data.pixels is not None else None
    return to_samples(data, spec.input.name, recipe)


RawData = tuple[dict[str, np.ndarray], Any, str]
"""A source's samples by input name, its labels as given and the prefix of its sample ids."""


def _dict_samples(spec: PipelineSpec, x: dict[str, Any], y: Any, prefix: str, where: str,
                  limit: int | None) -> Samples:
    """Samples of several inputs and/or per-sample label objects: every input checked against its
    spec (shape, same N), NaN/Inf refused per input, the hash over every input and the labels."""
    from calibration.data import CalibrationSet

    names = [i.name for i in spec.input_specs()]
    if sorted(x) != sorted(names):
        raise SpecError(f"{where}: the data has inputs {sorted(x)}, the model takes {names}; key the samples "
                        "(the callable's dict, the npz's arrays) by the inputs' names")
    arrays: dict[str, np.ndarray] = {}
    for spec_in in spec.input_specs():
        arr = _float_array(x[spec_in.name], f"input {spec_in.name!r}")
        if arr.ndim < 1 or tuple(arr.shape[1:]) != tuple(spec_in.shape[1:]):
            raise SpecError(f"{where}: input {spec_in.name!r} samples have shape {tuple(arr.shape[1:])}, the model "
                            f"expects {tuple(spec_in.shape[1:])} (its shape without the batch dim)")
        arrays[spec_in.name] = arr
    counts = {k: len(v) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise InputFileError(f"{where}: the inputs hold different numbers of samples ({counts}); give every input "
                             "the same samples on axis 0")
    n = next(iter(counts.values()))
    labels = read_labels(y, n, where)
    if limit and limit < n:
        arrays, n = {k: v[:limit] for k, v in arrays.items()}, limit
        labels = None if labels is None else labels[:limit]
    ids = [f"{prefix}[{i}]" for i in range(n)]
    sets = {k: CalibrationSet(v, tuple(ids)) for k, v in arrays.items()}  # empty, NaN/Inf, per-sample digests
    h = hashlib.sha256(b"edgeship-samples-v1")
    for name in names:
        h.update(name.encode() + b"\0" + sets[name].content_hash.encode())
    h.update(labels_digest(labels).encode())
    return Samples({k: sets[k].samples for k in names}, labels, ids, h.hexdigest())


def _float_array(value: Any, what: str) -> np.ndarray:
    from calibration.errors import CalibrationDataError

    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise CalibrationDataError(f"{what} is {type(value).__name__}, not an array of numbers ({exc}); "
                                   "give numpy arrays, samples on axis 0") from None


def read_labels(y: Any, n: int, where: str) -> "np.ndarray | list[Any] | None":
    """Labels as given: int class indices (an int64 array), or one object per sample (a list, kept
    on the host: e.g. ``{"boxes": [[x1, y1, x2, y2], ...], "classes": [...]}``), or None."""
    if y is None:
        return None
    if isinstance(y, np.ndarray) and y.dtype != object:
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise InputFileError(f"{where}: labels are {y.dtype} of shape {y.shape}; give {n} integer class "
                                 "indices, or a list of one label object per sample")
        return y.astype(np.int64)
    labels = list(y) if isinstance(y, (list, tuple, np.ndarray)) else None
    if labels is None or len(labels) != n:
        what = f"{len(labels)} labels" if labels is not None else type(y).__name__
        raise InputFileError(f"{where}: {what} for {n} samples; give one label per sample")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        return np.asarray(labels, dtype=np.int64)
    return labels


def labels_digest(labels: "np.ndarray | list[Any] | None") -> str:
    """sha256 of the labels (class indices or JSON of the label objects): part of the set's hash."""
    if labels is None:
        return "none"
    if isinstance(labels, np.ndarray):
        return hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest()
    text = json.dumps(labels, sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return hashlib.sha256(text.encode()).hexdigest()


def source_name(spec: PipelineSpec, src: DataSource) -> str:
    """The data source as a user recognises it: the file or folder, or the callable."""
    if isinstance(src, PythonSource):
        return f"callable {src.callable}"
    return str(spec.resolve_path(src.path))


def check_labels(spec: PipelineSpec, reference: np.ndarray, sets: dict[str, Samples]) -> None:
    """Labels of a top-k metric must be class indices of the model's output (N, C): 0 <= y < C.

    Called once the fp32 reference exists, so C is what the model really outputs. A label outside
    the range can never match, so the gate would compare 0 % with 0 % and pass. The rule is the
    metric registry's (pipeline.metrics), here applied to every labelled set, naming its source.
    """
    from pipeline.metrics import class_labels, class_scores

    metric = spec.evaluation.metric
    if metric not in ("top1", "top5"):
        return
    try:
        _, scores = class_scores({"output": reference}, str(metric))
    except SpecError as exc:
        raise SpecError(f"{spec.source_path}: field 'evaluation.metric': {exc}") from None
    for section, samples in sets.items():
        if samples.y is None:
            continue
        try:
            class_labels(samples.y, len(samples), int(scores.shape[1]), str(metric), samples.ids)
        except InputFileError as exc:
            src = source_name(spec, getattr(spec, section).source)
            raise InputFileError(f"{spec.source_path}: field '{section}.source' ({src}): {exc}") from None


MIN_HOLDOUT = 30
"""Fewest held-out calibration samples the INT8 search should judge methods and fallbacks on."""


def data_warnings(spec: PipelineSpec, target: TargetSpec, reference: np.ndarray,
                  sets: dict[str, Samples]) -> list[str]:
    """Problems found once the fp32 reference exists, before minutes of conversion are spent.

    Labels out of the model's range are an error (:func:`check_labels`); what may still be right
    but usually is not comes back as warnings: image folders numbered by the folders present when
    the model has more classes, an fp32 reference at or below chance, a holdout too small to judge
    the budget.
    """
    check_labels(spec, reference, sets)
    notes = [*_listing_warnings(spec, reference), *_chance_warning(spec, reference, sets.get("evaluation"))]
    if any(p == "int8" for _, p in target.runs()) and "calibration" in sets:
        notes.extend(_holdout_warning(spec, target, len(sets["calibration"])))
    return notes


def _outputs(reference: np.ndarray) -> int:
    return int(np.prod(reference.shape[1:])) if reference.ndim >= 2 else 0


def _listing_warnings(spec: PipelineSpec, reference: np.ndarray) -> list[str]:
    if spec.evaluation.metric != "top1":
        return []
    out = []
    for section in ("calibration", "evaluation"):
        src = getattr(spec, section).source
        if not isinstance(src, ImageFolderSource):
            continue
        labels = folder_labels(spec, src, f"{spec.source_path}: field '{section}.source'")
        if labels is None or not labels.numbered_by_listing:
            continue
        folders = len(labels.folders(spec.resolve_path(src.path)))
        if _outputs(reference) > folders:
            out.append(f"{section}.source ({src.path}): its {folders} class folders are numbered 0..{folders - 1} "
                       f"in sorted name order, but the model has {_outputs(reference)} outputs; if the folders "
                       "are some of the model's classes, say which with classes:, classes_file: or "
                       "labels: folder-number")
    return out


def _chance_warning(spec: PipelineSpec, reference: np.ndarray, evals: Samples | None) -> list[str]:
    classes = _outputs(reference)
    if spec.evaluation.metric != "top1" or evals is None or evals.y is None or classes < 2:
        return []
    accuracy = float((reference.reshape(len(reference), -1).argmax(1) == evals.y).mean()) * 100.0
    chance = 100.0 / classes
    if accuracy > chance:
        return []
    return [f"the fp32 reference scores top1 {accuracy:.2f}% on {len(evals.y)} samples, at or below chance "
            f"({chance:.2f}% for {classes} classes): every number after it is meaningless; check the labels "
            "(classes, labels: folder-number), the preprocessing (mean, std, color, resize) and the weights"]


def _holdout_warning(spec: PipelineSpec, target: TargetSpec, n: int) -> list[str]:
    from pipeline.validate.gate import budget_pp

    fraction = spec.calibration.holdout_fraction
    if not 0.0 < fraction < 1.0 or n < 2:
        return []  # the split itself refuses these
    held = min(n - 1, max(1, int(round(n * fraction))))  # as CalibrationSet.split
    budget = budget_pp(spec, target)
    # One sample more or less right moves the holdout's drop by 100 / held pp: it must not exceed
    # the budget, or the search cannot tell a build within budget from one that is not.
    needed = max(MIN_HOLDOUT, math.ceil(100.0 / budget) if budget > 0 else MIN_HOLDOUT)
    if held >= needed:
        return []
    return [f"calibration holds out {held} of {n} samples (holdout_fraction {fraction}) to choose the INT8 method "
            f"and fallback: one sample is {100.0 / held:.1f} pp against a {budget:g} pp budget; give at least "
            f"{needed} held-out samples ({math.ceil(needed / fraction)} calibration samples at this fraction)"]


def to_samples(data: "CalibrationSet", input_name: str, recipe: dict[str, Any] | None = None) -> Samples:
    """One input's samples; with ``recipe``, the set's uint8 pixels and how they were normalised."""
    pixels = {input_name: Pixels(data.pixels, recipe)} if recipe is not None and data.pixels is not None else {}
    return Samples(x={input_name: data.samples}, y=data.labels, ids=list(data.ids), sha256=data.content_hash,
                   pixels=pixels)


def _flat(samples: Samples) -> np.ndarray:
    """Every input of a sample side by side (N, total): one row per sample, for content checks."""
    return np.concatenate([v.reshape(len(v), -1) for v in samples.x.values()], axis=1)


def check_disjoint(calibration: Samples, evaluation: Samples, spec: PipelineSpec) -> None:
    """Refuse a calibration set that shares samples with the evaluation set (by content, all inputs)."""
    from calibration.data import CalibrationSet, check_overlap
    from calibration.errors import CalibrationDataError

    try:
        check_overlap(CalibrationSet(_flat(calibration), tuple(calibration.ids)),
                      CalibrationSet(_flat(evaluation), tuple(evaluation.ids)))
    except CalibrationDataError as exc:
        raise SpecError(f"{spec.source_path}: fields 'calibration' and 'evaluation': {exc}") from None


def _read_python(spec: PipelineSpec, src: PythonSource, where: str,
                 shape: tuple[int, ...]) -> "CalibrationSet | RawData":
    """A ``python`` source: ``callable(**kwargs)`` returns ``x`` or ``(x, labels)``; ``x`` an array
    (one input) or a dict input name -> array. Class labels of one input take the CalibrationSet
    route, everything else :func:`_dict_samples`."""
    from calibration.data import CalibrationSet

    out = call_user(src.callable, where, src.kwargs, spec_folder(spec))
    x, y = (out if isinstance(out, tuple) and len(out) == 2 else (out, None))
    if isinstance(x, dict):
        return x, y, src.callable
    x = _float_array(x, f"{src.callable} returned x that")
    if len(spec.input_specs()) > 1 or not (y is None or _class_indices(y)):
        return {spec.input.name: x}, y, src.callable
    ids = [f"{src.callable}[{i}]" for i in range(len(x))] if x.ndim else None
    return CalibrationSet.from_arrays(x, labels=y, ids=ids, input_shape=shape)


def _class_indices(y: Any) -> bool:
    arr = np.asarray(y) if isinstance(y, (list, tuple, np.ndarray)) else None
    return arr is not None and arr.dtype != object and arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer)


def _read_source(spec: PipelineSpec, src: DataSource, where: str, shape: tuple[int, ...],
                 limit: int | None) -> "CalibrationSet | RawData":
    from calibration.data import CalibrationSet, read_npz_arrays

    if isinstance(src, PythonSource):
        return _read_python(spec, src, where[:-1] + ".callable'", shape)
    if isinstance(src, NpzSource):
        names = [i.name for i in spec.input_specs()]
        if len(names) == 1:
            return CalibrationSet.from_numpy(spec.resolve_path(src.path), input_shape=shape)
        path = spec.resolve_path(src.path)
        arrays = read_npz_arrays(path, names)  # one array per input name, plus y (decisions.md)
        return {n: arrays[n] for n in names}, arrays.get("y"), path.name
    assert isinstance(src, ImageFolderSource)
    folder = spec.resolve_path(src.path)
    return CalibrationSet.from_image_folder(folder, image_preprocess(spec), labels=folder_labels(spec, src, where),
                                            limit=limit)


def image_preprocess(spec: PipelineSpec) -> "ImagePreprocess":
    """The spec's ``preprocessing`` for its (one) input: the geometry the host applies to image
    folders and the normalisation the host and the device share."""
    from calibration.data import ImagePreprocess

    pre, shape = spec.preprocessing, tuple(spec.input.shape[1:])
    h, w = (shape[1], shape[2]) if spec.input.layout == "NCHW" else (shape[0], shape[1])
    return ImagePreprocess(height=h, width=w, mean=tuple(pre.mean), std=tuple(pre.std), scale=pre.scale,
                           layout=spec.input.layout, color=pre.color,
                           resize=tuple(pre.resize) if pre.resize else None, resize_shorter=pre.resize_shorter,
                           center_crop=tuple(pre.center_crop) if pre.center_crop else None,
                           interpolation=pre.interpolation)


MAX_CLASSES_FILE = 1 << 20


def folder_labels(spec: PipelineSpec, src: ImageFolderSource, where: str) -> "FolderLabels | None":
    """How the source's class folders are numbered; None for a folder without class folders (unlabelled)."""
    from calibration.data import FolderLabels

    folder = spec.resolve_path(src.path)
    labelled = bool(src.classes or src.classes_file or src.labels or src.include)
    if not labelled and not (folder.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                                     for p in folder.iterdir())):
        return None
    classes = tuple(src.classes) if src.classes else None
    if src.classes_file:
        classes = _read_classes_file(spec.resolve_path(src.classes_file), where)
    return FolderLabels(classes=classes, folder_number=src.labels == "folder-number",
                        include=tuple(src.include or ()))


def _read_classes_file(path: Path, where: str) -> tuple[str, ...]:
    """One class folder name per line (blank lines skipped), in class-index order."""
    field = f"{where[:-1]}.classes_file' ({path})"
    if path.stat().st_size > MAX_CLASSES_FILE:
        raise InputFileError(f"{field}: more than {MAX_CLASSES_FILE >> 20} MiB; give one folder name per line")
    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{field}: cannot read it ({exc}); save it as UTF-8 text, one name per line") from None
    if not names:
        raise InputFileError(f"{field}: holds no names; write one class folder name per line")
    dup = next((n for n, count in Counter(names).items() if count > 1), None)
    if dup is not None:
        raise InputFileError(f"{field}: names {dup!r} twice; each class folder has one index")
    return tuple(names)
