"""Host side of the release store, written once against :class:`~pipeline.transport.base.Executor`.

A deploy is: read the release's file list (manifest.json ``files``) -> ``prepare`` on the device
(reuse a verified copy, resume an interrupted staging folder, hard-link files other releases
already hold once their bytes are re-hashed, report free space and damaged copies) -> free-space check -> upload what is missing, file by file, each
under the transfer deadline -> [fault hook] -> ``finalize`` on the device (sha256 of every file
against the manifest, atomic move into releases/, atomic ``current`` switch, prune, repair other releases' damaged
copies from the fresh one). Releases are kept per spec (the manifest's ``name``): each spec has its
own ``current``, history and rollback on the device. The device half lives in ``device_ops.py``;
both transports run it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pipeline.errors import DeviceError, SpecError
from pipeline.transport import device_ops
from pipeline.transport.base import Executor, ProgressFn, q

MANIFEST = "manifest.json"
_RELEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SKIP_DIRS = {"__pycache__"}
_OPS_SOURCE = Path(device_ops.__file__).read_text(encoding="utf-8")
MIB = float(1 << 20)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(release_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "size"}}`` for every file of a release except manifest.json.

    Packaging writes this as the manifest's ``files`` entry; the device checks every file against it.
    ``__pycache__`` folders are left out (the device's interpreter writes its own).
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(release_dir.rglob("*")):
        rel = path.relative_to(release_dir)
        if path.is_dir() or rel.as_posix() == MANIFEST or _SKIP_DIRS & set(rel.parts):
            continue
        if path.is_symlink():
            raise DeviceError(f"{release_dir}: {rel} is a symlink; releases hold plain files only")
        out[rel.as_posix()] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
    return out


def _normalize_listing(listed: Any, where: Path) -> dict[str, str]:
    """Accept ``{rel: sha}``, ``{rel: {"sha256": ...}}`` or ``[{"path", "sha256"}, ...]``."""
    if isinstance(listed, dict):
        items = [(k, v if isinstance(v, str) else (v or {}).get("sha256")) for k, v in listed.items()]
    elif isinstance(listed, list):
        items = [(e.get("path"), e.get("sha256")) for e in listed if isinstance(e, dict)]
    else:
        raise DeviceError(f"{where}: 'files' must be a mapping or a list; rebuild the release")
    out = {}
    for rel, sha in items:
        if not isinstance(rel, str) or not isinstance(sha, str) or len(sha) != 64:
            raise DeviceError(f"{where}: bad 'files' entry {rel!r}; rebuild the release")
        out[rel] = sha.lower()
    return out


def release_files(release_dir: Path) -> dict[str, tuple[str, int]]:
    """What a release consists of: ``{rel: (sha256, size)}``, manifest.json included.

    When manifest.json lists ``files``, the local folder must match it exactly (a mismatch is a
    packaging bug and is refused here, before anything reaches the device). Without ``files`` (hand-
    made releases) the folder's content is the list.
    """
    manifest_path = release_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{manifest_path}: cannot read the release manifest ({exc}); rebuild the release") from None
    actual = hash_tree(release_dir)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if listed is not None:
        expected = _normalize_listing(listed, manifest_path)
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        differ = sorted(r for r in expected if r in actual and actual[r]["sha256"] != expected[r])
        for what, names in (("missing", missing), ("not in the manifest", extra), ("changed since packaging", differ)):
            if names:
                raise DeviceError(f"{release_dir}: {', '.join(names[:3])} {what}; rebuild the release")
    files: dict[str, tuple[str, int]] = {}
    for rel, info in actual.items():
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DeviceError(f"{release_dir}: unsafe path {rel!r} in the release")
        files[rel] = (info["sha256"], int(info["size"]))
    files[MANIFEST] = (_sha256_file(manifest_path), manifest_path.stat().st_size)
    return files


def release_spec(release_dir: Path) -> str:
    """The spec a release was built from (manifest.json ``name``): its slot on the device."""
    path = release_dir / MANIFEST
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError) as exc:
        raise DeviceError(f"{path}: cannot read the release manifest ({exc}); rebuild the release") from None
    if not isinstance(name, str) or not _RELEASE_ID.match(name):
        raise DeviceError(f"{path}: names no spec ('name'); rebuild the release")
    if name in device_ops._ROOT_ENTRIES:
        raise SpecError(f"spec name {name!r} is a folder edgeship keeps at the top of transport.root on the device; "
                        "rename the spec")
    return name


@dataclass
class FaultHooks:
    """Fault injection for tests of things that cannot be produced for real deterministically.

    ``before_verify(staging_path)`` runs after the upload and before the on-device hash check
    (e.g. to corrupt a staged file, as a flaky SD card or a broken transfer would).
    """

    before_verify: Callable[[str], None] | None = None


class ReleaseStore:
    """Releases under ``root`` on one device, driven through an executor."""

    def __init__(self, ex: Executor, root: str, python: str, command_timeout_s: float) -> None:
        self.ex = ex
        self.root = root
        self.python = python
        self.command_timeout_s = command_timeout_s
        self.hooks = FaultHooks()

    def op(self, name: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Run one ``device_ops`` operation on the device and return its JSON answer."""
        cmd = f"{self.python} -c {q(_OPS_SOURCE)} {name} {q(json.dumps({'root': self.root, **args}))}"
        r = self.ex.run(cmd, timeout or self.command_timeout_s)
        lines = r.out.strip().splitlines()
        if r.rc != 0 or not lines:
            raise DeviceError(f"{self.ex.name}: release store '{name}' failed under {self.root}: {r.tail()}")
        try:
            out: dict[str, Any] = json.loads(lines[-1])
        except ValueError:
            raise DeviceError(f"{self.ex.name}: release store '{name}' printed no JSON: {lines[-1][:120]}") from None
        if out.get("not_ours"):
            raise DeviceError(f"{self.ex.name}: transport.root {out['not_ours']}; nothing was changed; point "
                              "transport.root at an empty or new folder (edgeship claims it on first use)")
        if out.get("refused"):
            raise DeviceError(f"{self.ex.name}: {out['refused']}")
        return out

    def listing(self) -> dict[str, Any]:
        """``{"legacy": bool, "specs": {spec: {"current", "previous", "releases", "details"}}}``."""
        return self.op("list", {})

    def record(self, spec: str, release_id: str, outcome: dict[str, Any]) -> None:
        """Keep the gate outcome of the deploy that shipped ``release_id`` on the device (the caller locks)."""
        self.op("record", {"spec": spec, "id": release_id, "outcome": outcome})

    def deploy(self, release_dir: Path, release_id: str, *, keep: int, transfer_timeout_s: float,
               ensure_locked: Callable[[], None], progress: ProgressFn | None = None) -> dict[str, Any]:
        """Upload (what is missing), verify on the device, switch atomically. See the module doc."""
        if not _RELEASE_ID.match(release_id):
            raise DeviceError(f"release id {release_id!r} must be letters, digits, '.', '_' or '-'")
        files = release_files(release_dir)
        slot = release_spec(release_dir)
        spec = {rel: [sha, size] for rel, (sha, size) in files.items()}
        plan = self.op("prepare", {"spec": slot, "id": release_id, "nonce": secrets.token_hex(4), "files": spec})
        path = f"{self.root}/{slot}/releases/{release_id}"
        base = {"release_id": release_id, "spec": slot, "path": path, "files": len(files),
                "release_bytes": sum(size for _, size in files.values())}
        if plan["state"] == "present":
            changed = plan["current"] != release_id
            if changed:
                ensure_locked()
                plan = self._switch(slot, release_id)
            return {**base, "bytes_moved": 0, "uploaded_files": 0, "linked_files": 0, "changed": changed,
                    "previous": plan["previous"]}

        need: dict[str, int] = plan["need"]
        needed = sum(files[rel][1] - off for rel, off in need.items())
        margin = max(1 << 20, needed // 50)  # filesystem overhead: blocks, inodes, directories
        if needed + margin > plan["free_bytes"]:
            raise DeviceError(
                f"{self.ex.name}: release {release_id} needs {needed / MIB:.1f} MiB more under {self.root} but only "
                f"{plan['free_bytes'] / MIB:.1f} MiB is free; nothing was changed (current: {plan['current']}); "
                "free space on the device or lower transport.keep_releases")
        moved = 0
        for rel, off in sorted(need.items()):
            ensure_locked()  # also the point where an interrupted deploy stops uploading
            total = files[rel][1]

            def _progress(done: int, rel: str = rel, off: int = off, total: int = total) -> None:
                if progress is not None:
                    progress(rel, off + done, total)

            moved += self.ex.put(release_dir / rel, f"{plan['staging']}/{rel}", transfer_timeout_s, off, _progress)
        if self.hooks.before_verify is not None:
            self.hooks.before_verify(plan["staging"])
        ensure_locked()
        fin = self.op("finalize", {"spec": slot, "id": release_id, "staging": plan["staging"], "files": spec, "keep": keep,
                                   "repair": plan.get("damaged", [])})
        if not fin["ok"]:
            bad = fin["bad"]
            raise DeviceError(
                f"{self.ex.name}: on-device sha256 check refused release {release_id} ({', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''} differ); bad files discarded, current is still {fin['current']}; "
                "rerun the deploy, and check the device's storage if it repeats")
        return {**base, "bytes_moved": moved, "uploaded_files": len(need), "linked_files": plan["linked"],
                "resumed_files": plan["resumed"], "changed": True, "previous": fin["previous"],
                "pruned": fin["pruned"], "repaired_files": fin.get("repaired", [])}

    def _switch(self, spec: str | None, to: str | None, clear: bool = False) -> dict[str, Any]:
        st = self.op("switch", {"spec": spec, "to": to, "clear": clear})
        if not st["ok"]:
            raise DeviceError(f"{self.ex.name}: cannot switch: {st['error']} (current: {st['current']})")
        return st

    def rollback(self, spec: str | None, to: str | None, ensure_locked: Callable[[], None]) -> str | None:
        """Switch the spec's ``current`` to ``to`` (default: its previous release). Returns the new
        current. ``spec`` None: the only spec on the device."""
        ensure_locked()
        cur = self._switch(spec, to)["current"]
        return None if cur is None else str(cur)

    def clear(self, spec: str, ensure_locked: Callable[[], None]) -> None:
        """Leave ``spec`` with no current release (its first release failed: there is nothing to go back to)."""
        ensure_locked()
        self._switch(spec, None, clear=True)
