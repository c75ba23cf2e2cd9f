"""Release-store operations that run ON the device: Python 3 standard library only.

The host never manipulates the release store with ad-hoc shell lines; it sends this file's source
to the device (``python3 -c <source> <op> <json-args>``) and reads one JSON document back. Local
and SSH transports run the very same program, so the layout and its invariants live in one place.

Releases are kept per spec name (a "slot"), so that deploying model B never replaces model A and
a failed B goes back to the previous B, never to A:

    <root>/<spec>/releases/<release_id>/     immutable, verified releases
    <root>/<spec>/releases/<id>/.edgeship-sha256sums   the verified file list (``sha256sum -c`` format)
    <root>/<spec>/staging/<id>.<nonce>/      an upload in progress (resumable); it lives in
                                             releases/.staging/ instead when releases/ is its own
                                             filesystem, so the final move stays one rename(2)
    <root>/<spec>/current -> releases/<id>   switched atomically (symlink + rename)
    <root>/<spec>/history                    one line per switch: "<unix time> <id>" (the time is
                                             shown, never decided on: the line order is)
    <root>/<spec>/gates.json                 {id: the gate outcome of the deploy that shipped it}
    <root>/.lock, .lock.owner                the per-device deploy lock (see lock.py), one per root
    <root>/.edgeship-root                    the marker: this folder is edgeship's (``_claim``)
    <root>/.agent.pid                        "<process group> <token>" of the last agent started
    <root>/engines/<key>/                    artifacts built on the device (agent/device_build.py)

A root written before slots existed (``<root>/releases``, ``<root>/current`` at the top) is
migrated once, under the deploy lock (``_migrate``): each release moves under the spec name its
manifest names.

Nothing here may import anything outside the standard library, and the code must stay compatible
with the oldest device Python we support (3.9): no ``match``, no ``X | Y`` at runtime.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time

SUMS = ".edgeship-sha256sums"
MARKER = ".edgeship-root"
AGENT_PID = ".agent.pid"
_CHUNK = 1 << 20
_RELEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: An upload in progress: ``<release id>.<nonce>`` (``.damaged`` while a bad copy is replaced).
_STAGING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.[0-9a-f]{8}(\.damaged)?$")
#: What edgeship itself writes at the top of a root (an unmarked root holding only these is an
#: older edgeship's, claimed as is; anything else there is someone's data).
_ROOT_ENTRIES = ("releases", "staging", "current", "current.tmp", "history", "history.tmp", ".lock",
                 ".lock.owner", "venv", "engines", AGENT_PID, MARKER)
GATES = "gates.json"
#: The slot of a migrated release whose manifest names no spec (hand-made, or unreadable).
UNNAMED = "unnamed"


def _sha256(path, sync=False):
    """sha256 of a file; with ``sync`` also fsync it (edge boards lose power; verify = durable)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Refused(Exception):
    """An operation that cannot run as asked (say why in one line); nothing was changed."""


def _slot(a, empty_ok=False):
    """The slot folder of the operation's spec: ``a["spec"]``, or the only spec holding releases
    (with ``empty_ok``, None when there is none).

    Spec names are folder names here, so one that is also a name edgeship uses at the top of the
    root (``releases``, ``engines``, ``venv``, ...) is refused rather than mixed with it.
    """
    root, spec = a["root"], a.get("spec")
    if spec is None:
        specs = [s for s in _slots(root) if _releases(os.path.join(root, s))]
        if not specs and empty_ok:
            return None
        if not specs:
            raise Refused("no release deployed under %s; run `edgeship deploy` first" % root)
        if len(specs) > 1:
            raise Refused("%s holds releases of %d specs (%s); name one with --spec" % (root, len(specs), ", ".join(specs)))
        spec = specs[0]
    if not _RELEASE_ID.match(spec) or spec in _ROOT_ENTRIES:
        raise Refused("spec name %r is reserved on the device (edgeship's own folder under transport.root); "
                      "rename the spec" % spec)
    return os.path.join(root, spec)


def _slots(root):
    """Spec names with a slot under ``root`` (a folder holding releases/), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if _RELEASE_ID.match(d) and d not in _ROOT_ENTRIES
                  and os.path.isdir(os.path.join(root, d, "releases")))


def _history(root):
    """[(time, id), ...] oldest first; tolerant of a torn last line. ``root``: a slot (or an old root)."""
    out = []
    try:
        with open(os.path.join(root, "history"), encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 2:
                    out.append((float(parts[0]), parts[1]))
    except (OSError, ValueError):
        pass  # no history yet (first deploy) or an unreadable one: nothing was ever switched
    return out


def _is_release(releases, name):
    """Only folders edgeship finalized are releases: a release id holding its verified list."""
    return bool(_RELEASE_ID.match(name)) and os.path.isfile(os.path.join(releases, name, SUMS))


def _releases(root):
    rel = os.path.join(root, "releases")
    if not os.path.isdir(rel):
        return []
    return sorted(d for d in os.listdir(rel) if _is_release(rel, d))


def _foreign(root):
    """Entries of an unmarked ``root`` that edgeship did not write (sorted)."""
    bad = [e for e in os.listdir(root) if e not in _ROOT_ENTRIES]
    rel, stage, venv = (os.path.join(root, d) for d in ("releases", "staging", "venv"))
    if os.path.isdir(rel):
        bad += ["releases/" + d for d in os.listdir(rel) if d != ".staging" and not _is_release(rel, d)]
    if os.path.isdir(stage):
        bad += ["staging/" + d for d in os.listdir(stage) if not _STAGING_NAME.match(d)]
    if os.path.lexists(venv) and not os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        bad.append("venv")
    return sorted(bad)


def _claim(root):
    """Make sure ``root`` is edgeship's before anything is written or deleted there.

    A root carrying the marker is ours. A missing or empty one, or one holding only what an older
    edgeship wrote, is claimed by writing the marker. Anything else is someone's folder (a
    ``transport.root`` pointed at the wrong place): refused, so that no cleanup ever deletes a
    file edgeship did not create. Returns None, or the reason for refusing.
    """
    if os.path.isfile(os.path.join(root, MARKER)):
        return None
    os.makedirs(root, exist_ok=True)
    foreign = _foreign(root)
    if foreign:
        return "%s already holds files edgeship did not write (%s%s) and no %s marker" % (
            root, ", ".join(foreign[:3]), " ..." if len(foreign) > 3 else "", MARKER)
    path = os.path.join(root, MARKER)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write("This folder is an edgeship release store; edgeship may delete anything in it.\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)
    return None


def _current(root):
    try:
        link = os.readlink(os.path.join(root, "current"))
    except OSError:
        return None
    return os.path.basename(link.rstrip("/"))


def _previous(root, current, existing):
    """The last release that was current before ``current`` and still exists."""
    for _, rid in reversed(_history(root)):
        if rid != current and rid in existing:
            return rid
    return None


def _by_recency(root, existing):
    """Existing releases, most recently current first; never-current ones last.

    By the order of the history's lines, not their timestamps: a device clock that is a year off
    (no RTC battery, no NTP yet) must not change which releases are kept.
    """
    last = {}
    for seq, (_, rid) in enumerate(_history(root)):
        last[rid] = seq
    return sorted(existing, key=lambda r: last.get(r, -1), reverse=True)


def _tree_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass  # deleted while we walked (the agent's __pycache__): it takes no space
    return total


def _free_bytes(root):
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _verify(folder, expected, sync=False):
    """Names of files in ``expected`` ({rel: sha256}) that are missing or differ under ``folder``."""
    bad = []
    for rel, sha in sorted(expected.items()):
        path = os.path.join(folder, rel)
        try:
            ok = os.path.isfile(path) and not os.path.islink(path) and _sha256(path, sync) == sha
        except OSError:
            ok = False
        if not ok:
            bad.append(rel)
    return bad


def _read_sums(folder):
    """The verified list a release carries: {rel: sha256}; None when absent or unreadable."""
    try:
        with open(os.path.join(folder, SUMS), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        if "  " in line:
            sha, rel = line.split("  ", 1)
            out[rel] = sha
    return out


def _state(root):
    existing = _releases(root)
    cur = _current(root)
    return {"current": cur, "previous": _previous(root, cur, existing), "releases": existing}


def _point(slot, rid):
    """Point the slot's ``current`` at releases/<rid> atomically: new symlink, rename(2) over the old."""
    tmp = os.path.join(slot, "current.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join("releases", rid), tmp)
    os.replace(tmp, os.path.join(slot, "current"))
    _fsync_dir(slot)


def _unlink_current(slot):
    """The slot has no current release any more (its only release failed its gate)."""
    try:
        os.remove(os.path.join(slot, "current"))
    except OSError:
        pass  # there was none
    _fsync_dir(slot)


def _write_atomic(path, text):
    """Replace ``path`` by ``text`` in one rename(2), durable (a torn file would lose every entry)."""
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)


def _gates(slot):
    """{release id: gate outcome} recorded by the deploys that shipped them ({} when none or torn)."""
    try:
        with open(os.path.join(slot, GATES), encoding="utf-8") as fh:
            out = json.load(fh)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _switch(root, rid):
    """Make releases/<rid> current in the slot ``root`` and append the switch to its history."""
    _point(root, rid)
    path = os.path.join(root, "history")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("%.3f %s\n" % (time.time(), rid))
        fh.flush()
        os.fsync(fh.fileno())
    entries = _history(root)
    if len(entries) > 1000:  # years of nightly deploys: keep the recent half, atomically
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines("%.3f %s\n" % e for e in entries[-500:])
        os.replace(tmp, path)


def _prune(root, keep):
    """Delete releases beyond the ``keep`` most recent previous ones; never current or previous."""
    existing = _releases(root)
    cur = _current(root)
    prev = _previous(root, cur, existing)
    others = [r for r in _by_recency(root, existing) if r != cur]
    protected = {cur, prev} | set(others[:keep])
    pruned = []
    for rid in existing:
        if rid not in protected:
            shutil.rmtree(os.path.join(root, "releases", rid))
            pruned.append(rid)
    gates = _gates(root)
    if any(rid in gates for rid in pruned):
        _write_atomic(os.path.join(root, GATES), json.dumps(dict((k, v) for k, v in gates.items() if k not in pruned)))
    return pruned


def _staging_root(root):
    """Where uploads are staged: <root>/staging, on the same filesystem as releases/.

    The final move into releases/ must be a rename(2) to be atomic, which only works within one
    filesystem. When releases/ is a mount of its own (a data partition, a quota'd tmpfs), staging
    moves to releases/.staging (dot names are never releases) and the other place is emptied.
    """
    releases = os.path.join(root, "releases")
    default = os.path.join(root, "staging")
    for d in (releases, default):
        os.makedirs(d, exist_ok=True)
    if os.stat(default).st_dev == os.stat(releases).st_dev:
        unused, chosen = os.path.join(releases, ".staging"), default
    else:
        unused, chosen = default, os.path.join(releases, ".staging")
        os.makedirs(chosen, exist_ok=True)
    if os.path.isdir(unused):
        for d in os.listdir(unused):
            if _STAGING_NAME.match(d):
                shutil.rmtree(os.path.join(unused, d), ignore_errors=True)
    return chosen


def _link_index(root, skip):
    """sha256 -> [paths of files other releases list with that hash] (link candidates, unverified).

    Every spec's releases count (models of one device share the agent and often data). A listed
    hash is what the file held when its release was verified, not what it holds now: the caller
    re-hashes a candidate before linking to it (see ``_linkable``). ``skip``: a release folder.
    """
    index = {}
    for spec in _slots(root):
        slot = os.path.join(root, spec)
        for rid in _releases(slot):
            folder = os.path.join(slot, "releases", rid)
            if folder == skip:
                continue
            for rel, sha in sorted((_read_sums(folder) or {}).items()):
                index.setdefault(sha, []).append(os.path.join(folder, rel))
    return index


def _linkable(root, candidates, sha, size, seen, damaged):
    """The first candidate whose bytes hash to ``sha`` now, or None.

    Releases hard-link identical files, so one damaged inode shows up in several releases: it is
    hashed once (``seen``: inode -> ok) and every path holding it goes to ``damaged`` (rel to the
    device root, sha) so that finalize can repair them from the fresh upload.
    """
    found = None
    for src in candidates:
        try:
            st = os.lstat(src)
        except OSError:
            continue  # pruned or lost since it was listed: not a candidate
        if not os.path.isfile(src) or os.path.islink(src):
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            try:
                seen[key] = st.st_size == size and _sha256(src) == sha
            except OSError:
                seen[key] = False
        if not seen[key]:
            damaged.append([os.path.relpath(src, root), sha])
        elif found is None:
            found = src
    return found


def _listing(slot):
    """One slot: current, previous, every release with its size, last switch time and gate outcome."""
    st = _state(slot)
    last = {}
    for t, rid in _history(slot):
        last[rid] = t
    gates = _gates(slot)
    st["details"] = [
        {"id": r, "bytes": _tree_bytes(os.path.join(slot, "releases", r)), "last_current": last.get(r),
         "gate": gates.get(r)}
        for r in _by_recency(slot, st["releases"])
    ]
    return st


def op_list(a):
    """What the store holds, per spec: ``{"specs": {name: listing}, "legacy": bool}``.

    With a ``spec`` argument (null: the only spec), ``{"slot": listing, "legacy"}`` instead.
    ``legacy``: the root still has the old layout (read-only here; the host migrates it under the
    lock and lists again).
    """
    root = a["root"]
    if "spec" in a:  # one spec's listing (the only spec's, for null), as "slot"
        slot = _slot(a, empty_ok=True)
        one = _listing(slot) if slot else {"current": None, "previous": None, "releases": [], "details": []}
        one["spec"] = os.path.basename(slot) if slot else None
        return {"legacy": _old_layout(root), "slot": one}
    return {"legacy": _old_layout(root), "specs": dict((s, _listing(os.path.join(root, s))) for s in _slots(root))}


def op_prepare(a):
    """Get a staging folder ready for release ``id``; say which files still need uploading.

    Args (JSON): root, id, nonce, files {rel: [sha256, size]}.
    Returns ``state="present"`` when a verified copy already sits in releases/ (nothing to upload),
    else ``state="staged"`` with ``staging`` and ``need`` {rel: resume offset}.
    """
    root, slot, rid, files = a["root"], _slot(a), a["id"], a["files"]
    staging_root = _staging_root(slot)
    expected = dict((rel, v[0]) for rel, v in files.items())
    target = os.path.join(slot, "releases", rid)
    broken = None
    if os.path.isdir(target):
        bad = _verify(target, expected)
        if not bad:
            out = _state(slot)
            out.update(state="present", free_bytes=_free_bytes(os.path.join(slot, "releases")))
            return out
        # Same id, other bytes. A copy that fails its own verified list is damaged: never link
        # from it. One that passes is intact (e.g. repackaged): its unchanged files are reused.
        own = _read_sums(target)
        if own is None or _verify(target, own):
            broken = target

    # Only the newest staging folder of this release survives (it is resumed); staging folders of
    # other releases belong to abandoned deploys (we hold the lock) and only take space.
    names = [d for d in os.listdir(staging_root) if _STAGING_NAME.match(d)]
    mine = [d for d in names if d.rsplit(".", 1)[0] == rid]
    # The one to resume is the one furthest along (content, not mtimes: the clock may be off).
    mine.sort(key=lambda d: _tree_bytes(os.path.join(staging_root, d)), reverse=True)
    for d in names:
        if not mine or d != mine[0]:
            shutil.rmtree(os.path.join(staging_root, d), ignore_errors=True)
    stage = os.path.join(staging_root, mine[0] if mine else "%s.%s" % (rid, a["nonce"]))
    os.makedirs(stage, exist_ok=True)

    # Files we did not ask for (older manifests, stray partials) go.
    for dirpath, _, names in os.walk(stage):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), stage)
            if rel not in files:
                os.remove(os.path.join(dirpath, n))

    index = _link_index(root, broken)
    releases = os.path.join(slot, "releases")
    need, linked, resumed, seen, damaged = {}, 0, 0, {}, []
    for rel, (sha, size) in sorted(files.items()):
        path = os.path.join(stage, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isfile(path) and not os.path.islink(path):
            have = os.path.getsize(path)
            if have == size and _sha256(path) == sha:
                continue
            if 0 < have < size:
                need[rel] = have  # an interrupted upload: continue where it stopped
                resumed += 1
                continue
            os.remove(path)
        src = _linkable(root, index.get(sha, []), sha, size, seen, damaged)
        if src is not None:
            # Releases are immutable, so an identical file is shared, not copied again.
            try:
                os.link(src, path)
            except OSError:
                shutil.copy2(src, path)
            linked += 1
            continue
        need[rel] = 0
    out = _state(slot)
    out.update(state="staged", staging=stage, need=need, linked=linked, resumed=resumed, damaged=damaged,
               free_bytes=_free_bytes(releases))
    return out


def _repair(root, folder, damaged, expected):
    """Replace other releases' damaged files (prepare's ``damaged``) by links to ``folder``'s.

    The release in ``folder`` was just verified, so its file with the same sha256 holds the right
    bytes; a damaged copy elsewhere (any spec's) is swapped for it atomically (link, then rename(2)
    over the bad one), which keeps those releases whole for a rollback. Returns the paths repaired
    (relative to the device root).
    """
    good = dict((sha, os.path.join(folder, rel)) for rel, sha in expected.items())
    repaired = []
    for rel, sha in damaged:
        path = os.path.normpath(os.path.join(root, rel))
        parts = os.path.relpath(path, root).split(os.sep)
        if sha not in good or len(parts) < 4 or parts[1] != "releases" or not os.path.isfile(path):
            continue  # not ours to touch, or pruned meanwhile
        try:
            if _sha256(path) == sha:
                continue  # an earlier entry (another link to the same inode) fixed it already
            tmp = path + ".edgeship-repair"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.link(good[sha], tmp)
            os.replace(tmp, path)
            repaired.append(rel)
        except OSError:
            pass  # left damaged: a rollback to that release says so and names the file
    return repaired


def op_finalize(a):
    """Verify the staged files on the device, move them into releases/, switch, prune.

    Args (JSON): root, id, staging, files {rel: [sha256, size]}, keep.
    A file whose hash differs is deleted from staging (so the next deploy uploads it again) and
    the release is refused: ``ok=false`` with ``bad`` naming the files; nothing else changes.
    """
    root, slot, rid, stage, files = a["root"], _slot(a), a["id"], a["staging"], a["files"]
    expected = dict((rel, v[0]) for rel, v in files.items())
    bad = _verify(stage, expected, sync=True)
    if bad:
        for rel in bad:
            try:
                os.remove(os.path.join(stage, rel))
            except OSError:
                pass  # missing files are among the bad ones: nothing to discard
        out = _state(slot)
        out.update(ok=False, bad=bad)
        return out
    with open(os.path.join(stage, SUMS), "w", encoding="utf-8") as fh:
        for rel in sorted(expected):
            fh.write("%s  %s\n" % (expected[rel], rel))
        fh.flush()
        os.fsync(fh.fileno())
    target = os.path.join(slot, "releases", rid)
    if os.path.isdir(target):
        # A damaged copy of the same id (prepare found it bad): move it aside first. If it was
        # current, ``current`` dangles between the two renames; it pointed at bad bytes anyway.
        trash = stage + ".damaged"
        os.rename(target, trash)
        os.rename(stage, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(stage, target)
    _fsync_dir(os.path.join(slot, "releases"))
    _switch(slot, rid)
    pruned = _prune(slot, int(a["keep"]))
    repaired = _repair(root, target, a.get("repair") or [], expected)
    out = _state(slot)
    out.update(ok=True, pruned=pruned, repaired=repaired)
    return out


def op_switch(a):
    """Make an existing release current (rollback) after re-verifying its files.

    Args (JSON): root, spec, to (a release id or null for the previous one), clear (with to null:
    leave the spec with no current release, e.g. its first release failed its gate).
    """
    slot = _slot(a)
    st = _state(slot)
    if a.get("clear") and not a.get("to"):
        _unlink_current(slot)
        out = _state(slot)
        out.update(ok=True)
        return out
    to = a.get("to") or st["previous"]
    if to is None:
        st.update(ok=False, error="no previous release to roll back to")
        return st
    if to not in st["releases"]:
        st.update(ok=False, error="release %s is not on the device" % to)
        return st
    folder = os.path.join(slot, "releases", to)
    sums = _read_sums(folder)
    bad = ["(no %s)" % SUMS] if sums is None else _verify(folder, sums)
    if bad:
        st.update(ok=False, error="release %s is damaged: %s %s its recorded sha256; deploy release %s again "
                  "to repair it" % (to, ", ".join(bad[:3]), "does not match" if len(bad) == 1 else "do not match", to))
        return st
    _switch(slot, to)
    out = _state(slot)
    out.update(ok=True)
    return out


def _manifest_files(folder):
    """{rel: sha256} the release's manifest.json lists (packaging's ``files``), {} when it lists none."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as fh:
            listed = json.load(fh).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return {"manifest.json": "unreadable"}  # never matches: reported as the damaged file
    if isinstance(listed, list):
        listed = dict((e.get("path"), e) for e in listed if isinstance(e, dict))
    out = {}
    for rel, v in listed.items():
        out[rel] = v if isinstance(v, str) else (v or {}).get("sha256", "")
    return out


def op_verify(a):
    """Re-hash the current release's files against its verified list and its manifest's ``files``.

    Returns ``ok``, ``release`` and ``bad`` (files missing or with other bytes). Measuring a
    release whose bytes changed since it was verified would gate something that was never built.
    """
    slot = _slot(a)
    rid = _current(slot)
    if rid is None:
        return {"ok": False, "release": None, "bad": [], "error": "nothing is deployed"}
    folder = os.path.join(slot, "releases", rid)
    expected = _read_sums(folder)
    if expected is None:
        return {"ok": False, "release": rid, "bad": [SUMS]}
    listed = _manifest_files(folder)
    # A file the manifest names with another hash than the verified list is damaged as well.
    bad = set(_verify(folder, expected)) | set(r for r, sha in listed.items() if expected.get(r) != sha)
    return {"ok": not bad, "release": rid, "bad": sorted(bad)}


def _agent_pids(token):
    """Live processes whose environment carries the agent run's token (None without /proc)."""
    if not os.path.isdir("/proc/self"):
        return None
    needle = ("EDGESHIP_AGENT_TOKEN=" + token).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # exited, waiting to be reaped: nothing left to stop
            with open("/proc/%s/environ" % entry, "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def _signal_agent(pgid, pids, sig):
    for kill, target in [(os.killpg, pgid)] + [(os.kill, p) for p in pids or []]:
        try:
            kill(target, sig)
        except OSError:
            pass  # already gone (the goal), or a pid that is not ours


def _discard(path):
    try:
        os.remove(path)
    except OSError:
        pass  # another stop_agent (the interrupt's and the worker's run at once) removed it first


def op_stop_agent(a):
    """Stop the agent the host started last (its whole process group): TERM, then KILL after 5 s.

    The host calls this when a deploy is interrupted, so that no agent keeps measuring after the
    lock is released. The token in ``.agent.pid`` is also in the agent's environment: a pid reused
    by an unrelated process since then is never signalled.
    """
    path = os.path.join(a["root"], AGENT_PID)
    try:
        with open(path, encoding="utf-8") as fh:
            pgid, token = fh.read().split()[:2]
        pgid = int(pgid)
    except (OSError, ValueError):
        return {"ok": True, "stopped": 0}
    pids = _agent_pids(token)
    if pids is not None and not pids:
        _discard(path)
        return {"ok": True, "stopped": 0}
    count = len(pids or [])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_agent(pgid, pids, sig)
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            pids = _agent_pids(token)
            if pids is not None and not pids:
                break
            time.sleep(0.05)
        if pids is not None and not pids:
            break
    left = _agent_pids(token)
    if not left:
        _discard(path)
    return {"ok": not left, "stopped": count, "left": left or []}


def op_record(a):
    """Record the gate outcome of the deploy that shipped release ``id`` of the spec (``gates.json``).

    Args (JSON): root, spec, id, outcome {"gate": passed | partial | failed, ...}. The first
    ``built_at`` seen for an id is kept: a redeploy of the same bytes does not rebuild them.
    """
    slot, rid = _slot(a), a["id"]
    if rid not in _releases(slot):
        raise Refused("release %s is not on the device" % rid)
    gates = _gates(slot)
    entry = dict(a["outcome"])
    if (gates.get(rid) or {}).get("built_at"):
        entry["built_at"] = gates[rid]["built_at"]
    gates[rid] = entry
    _write_atomic(os.path.join(slot, GATES), json.dumps(gates, sort_keys=True))
    return {"ok": True}


def _old_layout(root):
    """The root still holds releases the way edgeship wrote them before per-spec slots."""
    return bool(_releases(root)) or os.path.islink(os.path.join(root, "current")) or \
        os.path.isfile(os.path.join(root, "history"))


def _manifest_spec(folder):
    """The spec name a release's manifest.json names (``name``), or UNNAMED."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as fh:
            name = json.load(fh).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    ok = isinstance(name, str) and _RELEASE_ID.match(name) and name not in _ROOT_ENTRIES
    return name if ok else UNNAMED


def _migrate(root):
    """Move an old-layout root into per-spec slots; runs under the deploy lock, once.

    Safe to repeat after a crash at any point: releases already moved are found in their slots,
    each slot's history is rewritten whole from the old one (which goes last), and every move is
    one rename(2). Abandoned staging folders go; anything else edgeship did not write stays.
    Returns the specs that received releases.
    """
    if not _old_layout(root):
        return []
    owner = {}
    for spec in _slots(root):  # moved by an interrupted migration
        for rid in _releases(os.path.join(root, spec)):
            owner[rid] = spec
    for rid in _releases(root):
        owner[rid] = _manifest_spec(os.path.join(root, "releases", rid))
    entries, cur = _history(root), _current(root)
    for spec in sorted(set(owner.values())):
        os.makedirs(os.path.join(root, spec, "releases"), exist_ok=True)
        _write_atomic(os.path.join(root, spec, "history"),
                      "".join("%.3f %s\n" % e for e in entries if owner.get(e[1]) == spec))
    for rid in _releases(root):
        # shutil.move: one rename, or a copy when releases/ was a filesystem of its own
        shutil.move(os.path.join(root, "releases", rid), os.path.join(root, owner[rid], "releases", rid))
    if cur in owner:
        _point(os.path.join(root, owner[cur]), cur)
    for name in ("current", "current.tmp", "history", "history.tmp"):
        if os.path.lexists(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
    for d in (os.path.join(root, "staging"), os.path.join(root, "releases", ".staging")):
        if os.path.isdir(d):
            for n in os.listdir(d):
                if _STAGING_NAME.match(n):
                    shutil.rmtree(os.path.join(d, n), ignore_errors=True)
    for d in (os.path.join(root, "releases", ".staging"), os.path.join(root, "staging"), os.path.join(root, "releases")):
        try:
            os.rmdir(d)
        except OSError:
            pass  # not empty (someone's files: kept), or a mount point
    _fsync_dir(root)
    return sorted(set(owner.values()))


def op_migrate(a):
    """Migrate an old-layout root (the host calls this under the lock when ``list`` says legacy)."""
    return {"ok": True, "migrated": _migrate(a["root"])}


def op_claim(a):
    """Claim the root (see ``_claim``); mutating ops do this themselves first."""
    return {"ok": True}


#: Operations that write or delete under the root: each claims it first.
_MUTATING = ("claim", "prepare", "finalize", "switch", "record", "migrate")
#: Operations the host only runs under the deploy lock: an old-layout root is migrated first.
_MIGRATING = ("prepare", "finalize", "switch", "record", "migrate", "verify")

OPS = {"claim": op_claim, "verify": op_verify, "stop_agent": op_stop_agent, "list": op_list,
       "prepare": op_prepare, "finalize": op_finalize, "switch": op_switch, "record": op_record,
       "migrate": op_migrate}


def main(argv):
    op, args = argv[1], json.loads(argv[2])
    root = args["root"]
    refused = _claim(root) if op in _MUTATING else None
    if refused:
        out = {"ok": False, "not_ours": refused}
    else:
        try:
            if op in _MIGRATING and os.path.isfile(os.path.join(root, MARKER)):
                _migrate(root)
            out = OPS[op](args)
        except Refused as exc:
            out = {"ok": False, "refused": str(exc)}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
