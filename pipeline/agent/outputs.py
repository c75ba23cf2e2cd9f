"""Raw outputs travel from the device to the host inside the agent's one JSON document.

Transport: a compressed ``.npz`` (``numpy.savez_compressed``), base64 text, under the run's
``outputs`` key of the agent's reply. Not a side file on the device: the reply already comes back
whole over the one command the transport runs, so there is no second transfer to fail, no file
left behind on the device, and no stale file from an earlier run to be mistaken for this one's.
The host writes what it receives to its own side file next to results.json. Sizes stay small:
class scores are N x classes, and a detector's outputs are shrunk on the device by
``evaluation.postprocess`` first; past ``MAX_PACKED_BYTES`` the agent refuses, naming the outputs.

Floats go as float16 where the host's metric allows it (the host says so in the agent config),
else float32; integer outputs (e.g. detection classes) keep their values as int32.
Standard library and numpy only: this ships to the device; the host imports :func:`unpack`.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

MAX_PACKED_BYTES = 64 << 20


class TooLarge(ValueError):
    """The outputs would not fit in the reply; the message names them and the fix."""


def _wire(arr: np.ndarray, float16: bool) -> np.ndarray:
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr.astype(np.int32)
    return arr.astype(np.float16 if float16 else np.float32)


def pack(outputs: dict[str, np.ndarray], float16: bool) -> str:
    """Every output (name -> array, samples on axis 0) as base64 text of a compressed npz.

    The names go in a JSON list beside the arrays (npz member names are ``o0``, ``o1``, ...):
    an ONNX output name may hold characters a zip member name should not.
    """
    buf = io.BytesIO()
    names = list(outputs)
    arrays = {f"o{i}": _wire(outputs[n], float16) for i, n in enumerate(names)}
    np.savez_compressed(buf, __names__=np.frombuffer(json.dumps(names).encode(), dtype=np.uint8), **arrays)
    if buf.tell() > MAX_PACKED_BYTES:
        shapes = ", ".join(f"{n} {tuple(np.shape(outputs[n]))}" for n in names)
        raise TooLarge(f"the raw outputs ({shapes}) compress to {buf.tell() >> 20} MiB, more than the "
                       f"{MAX_PACKED_BYTES >> 20} MiB a reply carries; shrink them on the device with "
                       "evaluation.postprocess (e.g. decode + NMS), or evaluate fewer samples (validation.samples)")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def unpack(text: str) -> dict[str, np.ndarray]:
    """:func:`pack`'s text back to name -> array (float16 widened to float32), in the same order."""
    with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as npz:
        names = json.loads(bytes(npz["__names__"]).decode())
        out = {}
        for i, name in enumerate(names):
            arr = npz[f"o{i}"]
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        return out


def concat(parts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-batch output dicts -> one dict, samples on axis 0 (every batch has the same names)."""
    return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}
