"""Hand-made releases for transport tests: a manifest with a file list, the agent, some data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.transport import hash_tree

AGENT = Path(__file__).resolve().parents[2] / "pipeline" / "agent"


def make_release(folder: Path, release_id: str, payload: int | bytes = 64 * 1024,
                 extra: dict[str, bytes] | None = None) -> Path:
    """A release folder like packaging writes one: ``edgeship_agent/``, ``data/``, manifest.json.

    ``payload`` is the size of a random ``data/blob.bin`` (or its exact bytes).
    """
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(AGENT, folder / "edgeship_agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "data").mkdir(parents=True)
    blob = payload if isinstance(payload, bytes) else os.urandom(payload)
    (folder / "data" / "blob.bin").write_bytes(blob)
    for rel, content in (extra or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    manifest = {"release_id": release_id, "runs": [], "agent": {}, "files": {
        rel: info["sha256"] for rel, info in hash_tree(folder).items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    """{relative path: (size, mtime)} of everything under ``root`` (symlinks by their target)."""
    out: dict[str, tuple[int, float]] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime)
        if p.is_symlink():
            out[str(p.relative_to(root)) + " ->"] = (0, 0.0) if not os.readlink(p) else (len(os.readlink(p)), 0.0)
    return out
