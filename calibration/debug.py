"""Debugging: per-tensor SQNR of a QDQ model's activations against fp32.

For every activation tensor t the QDQ model quantizes, the value the next layer actually
consumes is the output of t's DequantizeLinear. Exposing those outputs stops onnxruntime from
fusing the affected nodes into integer kernels, so the numbers are the fake-quant semantics of
the model (equal to the integer kernels up to int32 accumulation rounding); that is what a
per-layer table needs to show where the error enters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.metrics import sqnr_db


def _dq_outputs(qdq_model) -> dict[str, str]:  # onnx.ModelProto -> {float tensor: DQ output}
    q_out = {n.output[0]: n.input[0] for n in qdq_model.graph.node if n.op_type == "QuantizeLinear"}
    return {
        q_out[n.input[0]]: n.output[0]
        for n in qdq_model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out
    }


def per_layer_sqnr(
    fp32_model: Path,
    qdq_model: Path,
    samples: np.ndarray,
    batch_size: int = 16,
    threads: int | None = None,
) -> list[dict[str, float | str]]:
    """SQNR (dB) of each quantized activation tensor, in graph order.

    Args:
        fp32_model: the float model.
        qdq_model: its QDQ version (tensor names preserved, as ORT's quantizer does).
        samples: inputs (the holdout).
        batch_size: samples per run.
        threads: onnxruntime intra-op threads.

    Returns:
        ``[{"tensor": name, "sqnr_db": value}, ...]``.
    """
    from calibration.graph import load_model, model_with_outputs
    from calibration.runtime import make_session, run_batches

    q_model = load_model(qdq_model)
    f_model = load_model(fp32_model)
    pairs = _dq_outputs(q_model)
    fp_names = {o for n in f_model.graph.node for o in n.output} | {i.name for i in f_model.graph.input}
    names = [t for t in pairs if t in fp_names]
    if not names:
        return []
    f_sess = make_session(model_with_outputs(f_model, names).SerializeToString(), threads=threads)
    q_sess = make_session(model_with_outputs(q_model, [pairs[t] for t in names]).SerializeToString(), threads=threads)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    q_iter = run_batches(q_sess, samples, batch_size, [pairs[t] for t in names])
    for (_, f_outs), (_, q_outs) in zip(run_batches(f_sess, samples, batch_size, names), q_iter):
        for t, f, q in zip(names, f_outs, q_outs):
            f64 = f.astype(np.float64)
            signal[t] += float(np.sum(f64**2))
            noise[t] += float(np.sum((f64 - q) ** 2))
    table = []
    for t in names:
        # reuse sqnr_db's capping rules on the accumulated sums
        db = sqnr_db(np.array([np.sqrt(signal[t])]), np.array([np.sqrt(signal[t]) - np.sqrt(noise[t])]))
        table.append({"tensor": t, "sqnr_db": round(db, 3)})
    return table


def format_table(rows: list[dict[str, float | str]]) -> str:
    """The per-layer table as fixed-width text, worst tensors marked."""
    if not rows:
        return "(no quantized tensors)"
    width = max(len(str(r["tensor"])) for r in rows)
    worst = sorted(rows, key=lambda r: float(r["sqnr_db"]))[: max(1, len(rows) // 10)]
    marks = {str(r["tensor"]) for r in worst}
    lines = [f"{'tensor':<{width}}  sqnr_db"]
    for r in rows:
        flag = "  <- worst 10%" if str(r["tensor"]) in marks else ""
        lines.append(f"{str(r['tensor']):<{width}}  {float(r['sqnr_db']):7.2f}{flag}")
    return "\n".join(lines)
