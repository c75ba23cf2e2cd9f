"""Content-addressed cache for stage outputs.

A key is the sha256 of the canonical JSON of everything that decides a stage's output: input
file hashes, options and tool versions. An entry is a folder, written under a temporary name and
renamed into place, so a failed or interrupted stage never leaves a half entry that looks done
and never touches the entries already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.workloads import cache_home


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_digest(*modules: str) -> str:
    """sha256 over the Python sources of the given packages/modules.

    Part of every stage's cache key, so a changed converter (a fix, a new calibration rule)
    invalidates what it built even when the version number did not move.
    """
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin))]
        for root in roots:
            root_path = Path(root)
            files = sorted(root_path.rglob("*.py")) if root_path.is_dir() else [root_path]
            for f in files:
                h.update(f.relative_to(root_path.parent).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def key_of(parts: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json(parts).encode())


@dataclass
class CacheResult:
    path: Path
    hit: bool
    key: str


class Cache:
    """A folder of ``<stage>/<key>/`` entries."""

    def __init__(self, root: Path | None = None) -> None:
        env = os.environ.get("EDGESHIP_STAGE_CACHE")
        self.root = Path(root) if root else (Path(env) if env else cache_home() / "stages")

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def get_or_build(self, stage: str, parts: dict[str, Any], build: Callable[[Path], None]) -> CacheResult:
        """Return the entry for ``parts``; on a miss, ``build(tmpdir)`` fills it atomically."""
        key = key_of({"stage": stage, **parts})
        final = self.entry(stage, key)
        if (final / ".complete").is_file():
            return CacheResult(final, True, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / "key.json").write_text(canonical_json({"stage": stage, **parts}))
            (tmp / ".complete").write_text(key)
            tmp.chmod(0o755)  # mkdtemp makes 0700; cache entries are plain build outputs
            if final.exists():  # a stale, incomplete entry from an older crash
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CacheResult(final, False, key)
