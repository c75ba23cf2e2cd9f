"""Large per-run arrays in side files beside results.json, named in it (shared/decisions.md).

In memory a run row carries its raw arrays (the agent's raw timings, its packed raw outputs); the
reports need them, results.json must not hold them. One mechanism serves every kind: a
:class:`Side` says which row key holds the data, which document key names the file and how a row's
value becomes arrays; :func:`split` strips them into ``{file: {key: array}}``, :func:`save` writes
each as one compressed .npz keyed ``<device>/<run id>`` (plus ``/<part>`` where a row holds several).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class Side:
    row_key: str  # where a run row holds the data in memory
    doc_key: str  # the results key naming the side file
    file: str  # the side file's name beside results.json
    arrays: Callable[[Any], dict[str, np.ndarray]]  # a row's value -> part name ("" for one) -> array


def keyed_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every run row of a results document with its key ``<device>/<run id>``."""
    return [(f"{d['device']}/{r['id']}", r) for d in results.get("devices", []) for r in d.get("runs", [])]


def split(results: dict[str, Any], sides: Iterable[Side]) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """(a copy of the document without the sides' arrays, naming each side file that has any;
    side file name -> key -> array). The caller's document is left as it was."""
    doc = copy.deepcopy(results)  # keeps the flat ``runs`` the same rows as the first device's
    found: dict[str, dict[str, np.ndarray]] = {}
    for side in sides:
        arrays: dict[str, np.ndarray] = {}
        for key, row in keyed_rows(doc):
            value = row.pop(side.row_key, None)
            if value is not None and len(value):
                arrays.update({f"{key}/{part}" if part else key: a for part, a in side.arrays(value).items()})
        if arrays:
            doc[side.doc_key] = side.file
            found[side.file] = arrays
    return doc, found


def save(folder: Path, files: dict[str, dict[str, np.ndarray]]) -> list[Path]:
    """Write each side file (compressed .npz) into ``folder``; the paths written."""
    written = []
    for name, arrays in files.items():
        with open(folder / name, "wb") as fh:  # a file object: keys hold '/', which savez keeps as member names
            np.savez_compressed(fh, **arrays)
        written.append(folder / name)
    return written
