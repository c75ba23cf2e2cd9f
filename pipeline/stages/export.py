"""Stage: PyTorch -> ONNX (the hub format), every output checked against PyTorch on real samples.

Several inputs are passed to ``forward`` in the spec's order (``inputs:``) and named after it.
Outputs may be a tensor, a tuple or list, or a dict of tensors (nested ones are flattened in
order); their ONNX names are the spec's ``outputs:``, else a dict's keys, else ``output`` for one
and ``output0``, ``output1``, ... for several.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import ConversionError, SpecError
from pipeline.spec import PipelineSpec

# Export check: fp32 ONNX Runtime vs PyTorch. Both are fp32 CPU; only op-order rounding differs.
EXPORT_RTOL = 1e-3
EXPORT_ATOL = 1e-4

Arrays = dict[str, np.ndarray]


@dataclass
class OnnxArtifact:
    path: Path
    input_names: list[str]
    output_names: list[str]
    info: dict[str, Any]


def flatten_outputs(out: Any) -> tuple[list[Any], list[str] | None]:
    """A model's outputs as a flat list of tensors, in the order the exporter flattens them, with
    the keys of a flat dict (the names a dict output suggests), else None."""
    if isinstance(out, dict):
        flat = [t for v in out.values() for t in flatten_outputs(v)[0]]
        flat_dict = len(flat) == len(out) and all(isinstance(k, str) for k in out)
        return flat, (list(out) if flat_dict else None)
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)[0]], None
    return [out], None


def output_names(spec: PipelineSpec, out: Any) -> list[str]:
    """The ONNX names of the model's outputs: the spec's, else generated (see the module doc)."""
    flat, keys = flatten_outputs(out)
    if spec.outputs is not None:
        if len(spec.outputs) != len(flat):
            raise SpecError(f"{spec.source_path}: field 'outputs': names {len(spec.outputs)} outputs "
                            f"({', '.join(spec.outputs)}), the model returns {len(flat)}; give one name per output, "
                            "in the order forward() returns them")
        return list(spec.outputs)
    if keys is not None:
        return keys
    return ["output"] if len(flat) == 1 else [f"output{i}" for i in range(len(flat))]


def _tensors(arrays: list[np.ndarray]) -> tuple[Any, ...]:
    import torch

    # writable copies: torch.from_numpy refuses (warns on) read-only arrays
    return tuple(torch.from_numpy(np.array(a, dtype=np.float32)) for a in arrays)


def torch_outputs(model: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The model's flattened outputs for the inputs ``arrays`` (in forward()'s order), no grad."""
    import torch

    with torch.no_grad():
        flat, _ = flatten_outputs(model(*_tensors(arrays)))
    return [t.detach().numpy() for t in flat]


def export_onnx(spec: PipelineSpec, load_model: Callable[[], Any], samples: Arrays, out_dir: Path) -> OnnxArtifact:
    """Export with torch.onnx (dynamo exporter), then compare ONNX Runtime to PyTorch on ``samples``."""
    import torch

    model = load_model()
    opset = int(spec.export.get("opset", 18))
    batch = spec.input.shape[0]
    names_in = [i.name for i in spec.input_specs()]
    example = _tensors([samples[n][:batch] for n in names_in])
    with torch.no_grad():
        names_out = output_names(spec, model(*example))
    kwargs: dict[str, Any] = {}
    if spec.input.batch == "dynamic":
        dim = torch.export.Dim("batch", min=1, max=1024)
        kwargs["dynamic_shapes"] = tuple({0: dim} for _ in names_in)
    out = out_dir / "model.onnx"
    # The exporter is chatty on stdout and warns about torchvision ops we never use.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, example, str(out), dynamo=True, external_data=False,
                              input_names=names_in, output_names=names_out, opset_version=opset, **kwargs)
    except Exception as exc:  # the exporter raises many types; surface one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"export to ONNX failed for {spec.name}: {first}") from exc
    n = len(next(iter(samples.values())))
    check_x = {k: v[: max(batch, min(n, 8))] for k, v in samples.items()}
    check = check_against_torch(model, out, check_x, batch)
    return OnnxArtifact(out, names_in, names_out, {"opset": opset, "torch": torch.__version__,
                                                   "inputs": names_in, "outputs": names_out, **check})


def onnx_session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: Arrays | np.ndarray, batch: int) -> Arrays:
    """Every output (name -> (N, ...) float32) of an ONNX model on CPU over ``x`` (input name ->
    array; an array for a one-input model), in chunks of ``batch`` (padding the last chunk)."""
    from pipeline.backends.checks import run_batched_all

    sess = onnx_session(path)
    if not isinstance(x, dict):
        x = {sess.get_inputs()[0].name: x}
    names = [o.name for o in sess.get_outputs()]
    return run_batched_all(lambda feeds: dict(zip(names, sess.run(names, feeds))), x, batch)


def first_output(outputs: Arrays) -> np.ndarray:
    """The first output (a classifier's logits: what top-1 and the image checks read)."""
    return next(iter(outputs.values()))


def compare_outputs(ref: Arrays, got: Arrays, rtol: float, atol_scale: float) -> tuple[bool, str, float]:
    """Whether every output of ``got`` is within tolerance of ``ref``: (ok, worst output, its max abs diff)."""
    worst, worst_diff, ok = "", 0.0, True
    for name, r in ref.items():
        g = got[name].reshape(r.shape)
        diff = float(np.max(np.abs(r - g))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        if not np.allclose(g, r, rtol=rtol, atol=atol_scale * (scale or 1.0)):
            ok = False
        if diff >= worst_diff:
            worst, worst_diff = name, diff
    return ok, worst, worst_diff


def check_against_torch(model: Any, onnx_path: Path, x: Arrays, batch: int) -> dict[str, Any]:
    """Every output of the ONNX model against PyTorch's on ``x`` (input name -> array, in
    forward()'s order; whole batches only)."""
    n = len(next(iter(x.values())))
    n -= n % batch
    chunks = [torch_outputs(model, [v[i:i + batch] for v in x.values()]) for i in range(0, n, batch)]
    got = run_onnx(onnx_path, {k: v[:n] for k, v in x.items()}, batch)
    if len(chunks[0]) != len(got):
        raise ConversionError(f"exported ONNX has {len(got)} outputs, PyTorch returns {len(chunks[0])}")
    ref = {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(got)}
    ok, worst, diff = compare_outputs(ref, got, EXPORT_RTOL, EXPORT_ATOL)
    if not ok:
        scale = float(np.max(np.abs(ref[worst]))) or 1.0
        raise ConversionError(f"exported ONNX disagrees with PyTorch: output {worst!r} max abs diff {diff:.3g} "
                              f"(output scale {scale:.3g}, tolerance rtol={EXPORT_RTOL}, atol={EXPORT_ATOL}*scale)")
    return {"export_check_max_abs_diff": diff, "export_check_samples": int(n)}
