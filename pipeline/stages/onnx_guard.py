"""Refuse ONNX files whose external data would be read from outside the model's folder.

An ONNX file can point its tensors at external files (``location`` in ``external_data``). A
crafted ``../../etc/shadow`` or an absolute path, or a symlink leading out, would make the
loader read arbitrary files; edgeship checks every location before loading any weights.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputFileError, SpecError


def check_onnx_file(model_path: Path, field: str = "model.onnx") -> list[str]:
    """A user's ONNX file, before anything else loads it: it parses, its external data stays in its
    folder and the ONNX checker accepts it. Returns the external-data locations; one line if refused."""
    import onnx

    locations = check_external_data(model_path, field)
    try:
        onnx.checker.check_model(str(model_path))  # by path: external data read from beside the model
    except Exception as exc:  # ValidationError and the C++ checker's other errors
        raise _refuse(model_path, field, "is not a valid ONNX model", exc) from None
    return locations


def check_external_data(model_path: Path, field: str = "model.onnx") -> list[str]:
    """Raise SpecError if an external-data location leaves the model's folder; returns the locations."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # DecodeError for a corrupt or truncated protobuf, OSError
        raise _refuse(model_path, field, "cannot be parsed as ONNX (corrupt or truncated?)", exc) from None
    base = model_path.parent.resolve()
    locations = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise SpecError(f"{model_path}: field '{field}': tensor {tensor.name!r} reads external data from "
                            f"{location!r}, outside the model's folder; keep external data files beside the model")
        if not target.is_file():
            raise SpecError(f"{model_path}: field '{field}': external data file {location!r} for tensor "
                            f"{tensor.name!r} not found beside the model")
        locations.append(location)
    return sorted(set(locations))


def _refuse(model_path: Path, field: str, what: str, exc: Exception) -> InputFileError:
    text = str(exc).strip()
    detail = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
    return InputFileError(f"{model_path}: field '{field}': {what} ({detail}); export the model again "
                          "(e.g. torch.onnx.export) or give model.factory")
