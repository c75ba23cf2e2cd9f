"""Stage: PyTorch -> ONNX (the hub format), checked numerically against PyTorch on real samples."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import ConversionError
from pipeline.spec import PipelineSpec

# Export check: fp32 ONNX Runtime vs PyTorch. Both are fp32 CPU; only op-order rounding differs.
EXPORT_RTOL = 1e-3
EXPORT_ATOL = 1e-4


@dataclass
class OnnxArtifact:
    path: Path
    input_name: str
    output_name: str
    info: dict[str, Any]


def export_onnx(spec: PipelineSpec, load_model: Callable[[], Any], sample: np.ndarray, out_dir: Path) -> OnnxArtifact:
    """Export with torch.onnx (dynamo exporter), then compare ONNX Runtime to PyTorch on ``sample``."""
    import torch

    model = load_model()
    opset = int(spec.export.get("opset", 18))
    batch = spec.input.shape[0]
    example = torch.from_numpy(np.array(sample[:batch], dtype=np.float32))  # a writable copy
    kwargs: dict[str, Any] = {}
    if spec.input.batch == "dynamic":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    out = out_dir / "model.onnx"
    # The exporter is chatty on stdout and warns about torchvision ops we never use.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (example,), str(out), dynamo=True, external_data=False,
                              input_names=[spec.input.name], output_names=["output"],
                              opset_version=opset, **kwargs)
    except Exception as exc:  # the exporter raises many types; surface one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"export to ONNX failed for {spec.name}: {first}") from exc
    check = check_against_torch(model, out, sample[: max(batch, min(len(sample), 8))], spec.input.name, batch)
    return OnnxArtifact(out, spec.input.name, "output", {"opset": opset, "torch": torch.__version__, **check})


def run_onnx(path: Path, x: np.ndarray, batch: int, input_name: str | None = None) -> np.ndarray:
    """Run an ONNX model on CPU over ``x`` in chunks of ``batch`` (padding the last chunk)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = input_name or sess.get_inputs()[0].name
    from pipeline.backends.checks import run_batched

    out = run_batched(lambda chunk: sess.run(None, {name: chunk})[0], x, batch)
    return out.reshape(len(x), *sess.get_outputs()[0].shape[1:]) if _static(sess) else out


def _static(sess: Any) -> bool:
    return all(isinstance(d, int) for d in sess.get_outputs()[0].shape[1:])


def check_against_torch(model: Any, onnx_path: Path, x: np.ndarray, input_name: str, batch: int) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(np.array(x[i:i + batch], dtype=np.float32))) for i in range(0, len(x) - batch + 1, batch)]).numpy()
    got = run_onnx(onnx_path, x[: len(ref)], batch, input_name)
    diff = float(np.max(np.abs(ref - got)))
    scale = float(np.max(np.abs(ref))) or 1.0
    if not np.allclose(got, ref, rtol=EXPORT_RTOL, atol=EXPORT_ATOL * scale):
        raise ConversionError(f"exported ONNX disagrees with PyTorch: max abs diff {diff:.3g} "
                              f"(output scale {scale:.3g}, tolerance rtol={EXPORT_RTOL}, atol={EXPORT_ATOL}*scale)")
    return {"export_check_max_abs_diff": diff, "export_check_samples": int(len(ref))}
