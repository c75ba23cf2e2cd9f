"""Each run's raw outputs (what its metric was computed from), in a side file beside results.json.

The same mechanism as the raw timings (pipeline/validate/timings.py): in memory a run row carries
its ``outputs`` (the agent's packed text, pipeline/agent/outputs.py); written out, they go to one
compressed .npz named by results.json's ``outputs_file``, keyed ``<device>/<run id>/<output>``
(shared/decisions.md: large arrays live in side files), and the document keeps none of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.validate.timings import keyed_rows

OUTPUTS_FILE = "outputs.npz"


def split_outputs(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the document without raw outputs, naming ``outputs_file`` when there were any; the arrays)."""
    from pipeline.agent.outputs import unpack

    doc = copy.deepcopy(results)
    found: dict[str, np.ndarray] = {}
    for key, row in keyed_rows(doc):
        packed = row.pop("outputs", None)
        if packed:
            found.update({f"{key}/{name}": arr for name, arr in unpack(packed).items()})
    if found:
        doc["outputs_file"] = OUTPUTS_FILE
    return doc, found


def save_outputs(folder: Path, outputs: dict[str, np.ndarray]) -> Path | None:
    """Write the side file (compressed) into ``folder``; None when there is nothing to write."""
    if not outputs:
        return None
    path = folder / OUTPUTS_FILE
    with open(path, "wb") as fh:  # a file object: keys hold '/', which savez keeps as member names
        np.savez_compressed(fh, **outputs)
    return path


def read_outputs(folder: Path, name: str = OUTPUTS_FILE) -> dict[str, dict[str, np.ndarray]]:
    """``<device>/<run id>`` -> output name -> array, from a side file :func:`save_outputs` wrote."""
    runs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(folder / name, allow_pickle=False) as data:
        for key in data.files:
            device, rid, output = key.split("/", 2)
            runs.setdefault(f"{device}/{rid}", {})[output] = data[key]
    return runs
