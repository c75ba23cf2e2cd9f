"""Refuse ONNX files whose external data would be read from outside the model's folder.

An ONNX file can point its tensors at external files (``location`` in ``external_data``). A
crafted ``../../etc/shadow`` or an absolute path, or a symlink leading out, would make the
loader read arbitrary files; edgeship checks every location before loading any weights.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SpecError


def check_external_data(model_path: Path, field: str = "model.onnx") -> list[str]:
    """Raise SpecError if an external-data location leaves the model's folder; returns the locations."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
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
