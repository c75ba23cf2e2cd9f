"""Each run's raw outputs (what its metric was computed from), in a side file beside results.json.

The same mechanism as the raw timings (pipeline/validate/timings.py): in memory a run row carries
its ``outputs`` (the agent's packed text, pipeline/agent/outputs.py); written out, they go to one
compressed .npz named by results.json's ``outputs_file``, keyed ``<device>/<run id>/<output>``
(shared/decisions.md: large arrays live in side files), and the document keeps none of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.validate.sidefiles import Side

OUTPUTS_FILE = "outputs.npz"


def _unpacked(packed: str) -> dict[str, np.ndarray]:
    from pipeline.agent.outputs import unpack

    return unpack(packed)


OUTPUTS = Side("outputs", "outputs_file", OUTPUTS_FILE, _unpacked)


def read_outputs(folder: Path, name: str = OUTPUTS_FILE) -> dict[str, dict[str, np.ndarray]]:
    """``<device>/<run id>`` -> output name -> array, from the side file write_reports wrote."""
    runs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(folder / name, allow_pickle=False) as data:
        for key in data.files:
            device, rid, output = key.split("/", 2)
            runs.setdefault(f"{device}/{rid}", {})[output] = data[key]
    return runs
