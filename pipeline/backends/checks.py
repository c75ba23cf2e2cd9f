"""Post-conversion numeric checks, with every threshold in one place.

Every backend compares its artifact, run by the same runner class the device uses, with the
fp32 ONNX Runtime reference on real samples, and fails the build when the numbers break.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calibration.metrics import sqnr_db, top1_agreement

from pipeline.errors import ConversionError

# Max abs diff allowed, relative to the largest reference output magnitude.
FP32_REL_TOL = 1e-3
FP16_REL_TOL = 2e-2
# int8 is lossy by design: demand signal fidelity and mostly-agreeing decisions.
INT8_MIN_SQNR_DB = 12.0
INT8_MIN_TOP1_AGREEMENT = 80.0


def compare(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    ref = reference.reshape(len(reference), -1)
    out = output.reshape(len(output), -1)
    scale = float(np.max(np.abs(ref))) or 1.0
    return {
        "max_abs_diff": float(np.max(np.abs(ref - out))),
        "rel_diff": float(np.max(np.abs(ref - out))) / scale,
        "sqnr_db": round(sqnr_db(ref, out), 3),
        "top1_agreement": round(top1_agreement(ref, out), 3),
        "samples": int(len(ref)),
    }


def check_outputs(backend: str, precision: str, reference: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """Compare and raise ConversionError (one line) when a threshold is broken."""
    if output.shape[0] != reference.shape[0] or output.size != reference.size:
        raise ConversionError(f"{backend} {precision}: output shape {output.shape} differs from the "
                              f"reference {reference.shape}")
    stats = compare(reference, output)
    if not np.all(np.isfinite(output)):
        raise ConversionError(f"{backend} {precision}: outputs contain NaN or Inf")
    if precision in ("fp32", "fp16"):
        tol = FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL
        if stats["rel_diff"] > tol:
            raise ConversionError(f"{backend} {precision}: max abs diff {stats['max_abs_diff']:.3g} is "
                                  f"{stats['rel_diff']:.2e} of the output scale, above the tolerance {tol:.0e}")
    else:
        if stats["sqnr_db"] < INT8_MIN_SQNR_DB:
            raise ConversionError(f"{backend} {precision}: SQNR {stats['sqnr_db']:.1f} dB vs fp32 is below "
                                  f"{INT8_MIN_SQNR_DB} dB")
        if stats["top1_agreement"] < INT8_MIN_TOP1_AGREEMENT:
            raise ConversionError(f"{backend} {precision}: top-1 agreement {stats['top1_agreement']:.1f}% "
                                  f"with fp32 is below {INT8_MIN_TOP1_AGREEMENT}%")
    return {"check": stats}


def run_runner(runner_name: str, workdir: Any, config: dict[str, Any], x: np.ndarray, batch: int,
               threads: int = 2) -> np.ndarray:
    """Run ``x`` through the agent's runner class on the host (the code the device runs)."""
    from pipeline.agent.runners import load_runner_module

    runner = load_runner_module(runner_name).Runner(workdir, config, threads)
    runner.activate()
    try:
        return run_batched(runner.infer, x, batch)
    finally:
        runner.deactivate()


def run_batched(infer: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """``infer`` over ``x`` in chunks of a static ``batch``; the last chunk is padded with its last
    sample and the padding dropped from the outputs. Returns (N, -1) float32."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        outs.append(np.asarray(infer(np.ascontiguousarray(chunk, dtype=np.float32)), dtype=np.float32)
                    .reshape(batch, -1)[:real])
    return np.concatenate(outs)
