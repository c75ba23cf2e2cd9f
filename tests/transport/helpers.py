"""Hand-made releases for transport tests: a manifest with a file list, the agent, some data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.transport import hash_tree

AGENT = Path(__file__).resolve().parents[2] / "pipeline" / "agent"


#: The spec name hand-made releases carry (their slot on the device: <root>/demo/releases/<id>).
SPEC = "demo"


def make_release(folder: Path, release_id: str, payload: int | bytes = 64 * 1024,
                 extra: dict[str, bytes] | None = None, spec: str = SPEC) -> Path:
    """A release folder like packaging writes one: ``edgeship_agent/``, ``data/``, manifest.json.

    ``payload`` is the size of a random ``data/blob.bin`` (or its exact bytes); ``spec`` the
    manifest's ``name``.
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
    manifest = {"release_id": release_id, "name": spec, "runs": [], "agent": {}, "files": {
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


def old_layout_root(root: Path, releases: list[Path], current: str | None, history: list[str]) -> None:
    """A device root as edgeship wrote it before per-spec slots, built by hand (no marker):
    ``releases/<id>/`` with its verified list, ``current -> releases/<id>``, ``history``, and an
    abandoned upload under ``staging/``. ``releases`` are folders made by :func:`make_release`."""
    for folder in releases:
        rid = json.loads((folder / "manifest.json").read_text())["release_id"]
        dest = root / "releases" / rid
        shutil.copytree(folder, dest)
        sums = {rel: info["sha256"] for rel, info in hash_tree(dest).items()}
        sums["manifest.json"] = hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
        (dest / ".edgeship-sha256sums").write_text("".join(f"{sha}  {rel}\n" for rel, sha in sorted(sums.items())))
    if current is not None:
        os.symlink(f"releases/{current}", root / "current")
    (root / "history").write_text("".join(f"{1700000000 + i}.000 {rid}\n" for i, rid in enumerate(history)))
    (root / "staging" / "Z.0123abcd").mkdir(parents=True)
    (root / "staging" / "Z.0123abcd" / "half.bin").write_bytes(b"x" * 100)
