"""Carry one calibration plan onto another runtime's tensors.

Converters rename and fuse tensors (pnnx numbers ncnn blobs, torch.export names FX nodes after
aten ops), so ONNX tensor names cannot be looked up in the converted model. They do not need to
be: a converted fp32 model computes the same values as the ONNX model on the same input. We run
both on a few calibration samples and pair each of the other runtime's tensors with the ONNX
tensor that holds the same numbers (relative L2 error below ``tol``). The plan's range for that
ONNX tensor is then the range the other runtime uses, so every backend quantizes with the ranges
chosen once, on the same statistics.

A tensor with no numeric twin (a value that only exists after fusion) is reported as unmatched;
the caller decides what to do with it (ncnn and TFLite observe it themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: relative L2 error under which two tensors are the same value (fp32 runtimes agree to ~1e-6;
#: the error grows with depth, so allow some slack, still far below what a ReLU removes)
MATCH_TOL = 1e-3


def onnx_activations(
    model_path: Path, samples: np.ndarray, batch_size: int = 16, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Every float activation tensor of the ONNX model on ``samples`` (plus the graph input).

    Returns:
        tensor name -> array with the samples on axis 0.
    """
    from calibration.graph import activation_tensors, load_model, model_with_outputs
    from calibration.runtime import make_session, run_batches

    model = load_model(Path(model_path))
    names = activation_tensors(model)
    session = make_session(model_with_outputs(model, names).SerializeToString(), threads=threads)
    known = [o.name for o in session.get_outputs() if o.name in set(names)]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in known}
    for _, outs in run_batches(session, np.asarray(samples, np.float32), batch_size, known):
        for n, o in zip(known, outs):
            parts[n].append(np.asarray(o, np.float32))
    out = {n: np.concatenate(p) for n, p in parts.items() if p}
    out[session.get_inputs()[0].name] = np.asarray(samples, np.float32)
    return out


@dataclass
class TensorMatch:
    """Result of :func:`match_tensors`.

    Attributes:
        pairs: their tensor -> our (ONNX) tensor.
        errors: their tensor -> relative L2 error of the chosen pair.
        unmatched: their tensors with no ONNX twin within the tolerance.
    """

    pairs: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def match_tensors(
    theirs: dict[str, np.ndarray], ours: dict[str, np.ndarray], tol: float = MATCH_TOL
) -> TensorMatch:
    """Pair each of ``theirs`` with the ONNX tensor of ``ours`` that holds the same values.

    Both sides hold the same samples on axis 0. A 4-D tensor of theirs is compared as it is and,
    for a channels-last runtime, as NHWC -> NCHW. Candidates must have the same number of
    elements; among those within ``tol`` the closest wins (a Reshape output and its
    input hold identical values, and the plan gives them identical ranges, so ties are harmless).

    Args:
        theirs: the other runtime's tensor name -> array.
        ours: ONNX tensor name -> array (:func:`onnx_activations`).
        tol: relative L2 error allowed.
    """
    by_size: dict[int, list[tuple[str, np.ndarray, float]]] = {}
    for name, arr in ours.items():
        flat = np.asarray(arr, np.float64).ravel()
        by_size.setdefault(flat.size, []).append((name, flat, float(np.linalg.norm(flat))))
    result = TensorMatch()
    for name, arr in theirs.items():
        a = np.asarray(arr, np.float64)
        views = [a.ravel()] + ([a.transpose(0, 3, 1, 2).ravel()] if a.ndim == 4 else [])
        best, best_err = None, np.inf
        for cand, ref, norm in by_size.get(a.size, []):
            err = min(float(np.linalg.norm(v - ref)) for v in views) / max(norm, 1e-12)
            if err < best_err:
                best, best_err = cand, err
        if best is not None and best_err <= tol:
            result.pairs[name] = best
            result.errors[name] = best_err
        else:
            result.unmatched.append(name)
    return result
