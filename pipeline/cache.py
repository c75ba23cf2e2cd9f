"""Content-addressed cache for stage outputs.

A key is the sha256 of the canonical JSON of everything that decides a stage's output: input
file hashes, options and tool versions. An entry is a folder, written under a temporary name and
renamed into place, so a failed or interrupted stage never leaves a half entry that looks done
and never touches the entries already there.

An entry's ``.complete`` records the sha256 of its content; every use re-hashes the entry and
rebuilds it when the bytes changed since (a corrupted artifact must never be packaged with the
numbers measured on the good one). A temporary folder carries its builder's pid in its name, so
the folders of a killed build are recognised and removed by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import BadInput, EdgeshipError
from pipeline.paths import project_home

COMPLETE = ".complete"
_TMP = re.compile(r"^\.tmp-(\d+)-")  # .tmp-<pid>-<key prefix>-<random>: a build in progress
_OLD_TMP_AGE_S = 24 * 3600  # temp folders of older versions carry no pid: removed after a day


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


def tree_digest(folder: Path, skip: tuple[str, ...] = (COMPLETE,)) -> str:
    """sha256 over every file under ``folder`` (relative names and contents), in a stable order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (converters wrap what they raise), if there is one."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def disk_full_error(folder: Path, what: str, need_bytes: int) -> EdgeshipError:
    """One line for a full disk: where, how much is free, how much to free, what was kept."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    more_mb = max(1, -(-(need_bytes - free) // 2**20))
    return EdgeshipError(f"no space left on the disk of {folder} while writing {what} "
                         f"({free / 2**20:.1f} MB free, needs at least {need_bytes / 2**20:.1f} MB): free "
                         f"{more_mb} MB there or use a bigger disk; what was there before is kept")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass
class CacheResult:
    path: Path
    hit: bool
    key: str
    note: str = ""  # why a cached entry was rebuilt (shown in the build log)


class Cache:
    """A folder of ``<stage>/<key>/`` entries."""

    def __init__(self, root: Path | None = None) -> None:
        env = os.environ.get("EDGESHIP_STAGE_CACHE")
        self.root = Path(root) if root else (Path(env) if env else project_home() / "stages")
        self._swept = False

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def get_or_build(self, stage: str, parts: dict[str, Any], build: Callable[[Path], None]) -> CacheResult:
        """Return the entry for ``parts``; on a miss (or a damaged entry), ``build(tmpdir)`` fills it atomically."""
        if not self._swept:
            self._swept = True
            self.sweep()
        key = key_of({"stage": stage, **parts})
        final = self.entry(stage, key)
        note = self._check(final)
        if (final / COMPLETE).is_file() and not note:
            return CacheResult(final, True, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key[:12]}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / "key.json").write_text(canonical_json({"stage": stage, **parts}))
            (tmp / COMPLETE).write_text(json.dumps({"key": key, "sha256": tree_digest(tmp)}))
            tmp.chmod(0o755)  # mkdtemp makes 0700; cache entries are plain build outputs
            if final.exists():  # a stale, incomplete or damaged entry
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as exc:
            written = _folder_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(exc) is not None:
                raise disk_full_error(self.root, f"the {stage} stage cache entry", written + 2**16) from exc
            raise
        return CacheResult(final, False, key, note)

    def _check(self, final: Path) -> str:
        """'' when ``final`` is a complete entry whose content still has its recorded digest."""
        try:
            recorded = json.loads((final / COMPLETE).read_text())["sha256"]
        except FileNotFoundError:
            return ""  # a plain miss
        except (OSError, ValueError, KeyError, TypeError):
            return "cached entry has no content digest (older edgeship): rebuilt"
        if tree_digest(final) != recorded:
            return "cached entry was modified or corrupted since it was built: rebuilt"
        return ""

    def sweep(self) -> list[Path]:
        """Remove temporary folders whose builder is gone (killed builds); returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for tmp in self.root.glob("*/*/.*"):
            if not tmp.is_dir():
                continue
            match = _TMP.match(tmp.name)
            try:
                stale = (not _pid_alive(int(match.group(1))) if match
                         else time.time() - tmp.stat().st_mtime > _OLD_TMP_AGE_S)
            except OSError:
                continue
            if stale:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def stages(self) -> dict[str, tuple[int, int]]:
        """Stage name -> (complete entries, bytes on disk) for ``edgeship cache info``."""
        if not self.root.is_dir():
            return {}
        return {d.name: (sum(1 for _ in d.glob(f"*/*/{COMPLETE}")), _folder_bytes(d))
                for d in sorted(self.root.iterdir()) if d.is_dir()}

    def clean(self, stage: str | None = None) -> int:
        """Remove every entry (or one stage's); returns the bytes freed. A build running now only
        loses its hits: its own entries are written under temporary names and renamed in after."""
        known = self.stages()
        if stage is not None and stage not in known:
            raise BadInput(f"no stage {stage!r} in the cache at {self.root}; stages there: "
                           f"{', '.join(known) or 'none'} (see `edgeship cache info`)")
        freed = 0
        for name in [stage] if stage is not None else list(known):
            freed += known[name][1]
            shutil.rmtree(self.root / name, ignore_errors=True)
        return freed
