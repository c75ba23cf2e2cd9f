"""Thin onnxruntime helpers (sessions, batched runs), imported lazily by the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationError


def make_session(model: Path | bytes, threads: int | None = None, optimize: bool = True) -> Any:
    """Create a CPU onnxruntime session.

    Args:
        model: model path or serialized bytes.
        threads: intra-op threads (None: onnxruntime's default).
        optimize: graph optimizations on (off keeps Q/DQ nodes unfused, i.e. fake quantization).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph...)
        raise CalibrationError(f"onnxruntime cannot load the model: {exc}") from exc


def batch_size_for(session: Any, wanted: int) -> int:
    """The batch size to feed: the model's fixed batch dimension if it has one, else ``wanted``."""
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return int(dim) if isinstance(dim, int) and dim > 0 else wanted


def run_batches(
    session: Any, samples: np.ndarray, batch_size: int, output_names: list[str] | None = None
) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Run ``samples`` through ``session`` in batches.

    Yields:
        (slice of the samples, list of outputs) per batch.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CalibrationError(
            f"model has {len(inputs)} inputs ({[i.name for i in inputs]}); calibration supports one"
        )
    name = inputs[0].name
    bs = batch_size_for(session, batch_size)
    n = samples.shape[0]
    for start in range(0, n, bs):
        sl = slice(start, min(n, start + bs))
        batch = samples[sl]
        if batch.shape[0] < bs and batch_size_for(session, 0) == bs:
            # fixed-batch model: pad the last batch and drop the padded rows from the outputs
            pad = np.repeat(batch[-1:], bs - batch.shape[0], axis=0)
            outs = session.run(output_names, {name: np.concatenate([batch, pad])})
            outs = [o[: batch.shape[0]] for o in outs]
        else:
            outs = session.run(output_names, {name: np.ascontiguousarray(batch)})
        yield sl, outs


def predict(session: Any, samples: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """First model output for all samples, concatenated on the batch axis, as float32."""
    first = session.get_outputs()[0].name
    parts = [outs[0] for _, outs in run_batches(session, samples, batch_size, [first])]
    return np.concatenate(parts).astype(np.float32, copy=False)
