"""transport.root is owned: a marker on first use, someone else's folder refused, nothing foreign pruned."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import open_transport
from tests.transport.helpers import SPEC, make_release, old_layout_root, snapshot


def _user_folder(root: Path) -> None:
    """What a user keeps in a folder that happens to be named like edgeship's layout."""
    for rel, text in {"notes.txt": "mine", "staging/draft.txt": "half-written", "releases/photos/cat.jpg": "jpeg",
                      "releases/2024-backup/db.sql": "dump"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_existing_user_folder_is_refused_and_left_untouched(local_target: TargetSpec, tmp_path: Path) -> None:
    root = Path(local_target.transport.root)
    _user_folder(root)
    before = snapshot(root)
    with open_transport(local_target) as t:
        with pytest.raises(DeviceError) as err:
            t.deploy(make_release(tmp_path / "A", "A"), "A")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"transport.root {root} already holds files edgeship did not write (notes.txt, releases/2024-backup" in msg
    assert msg.endswith("point transport.root at an empty or new folder (edgeship claims it on first use)")
    assert snapshot(root) == before  # not even a lock file


def test_new_root_is_marked_and_foreign_release_folders_are_never_pruned(local_target: TargetSpec,
                                                                         tmp_path: Path) -> None:
    root = Path(local_target.transport.root)
    local_target.transport.keep_releases = 1
    with open_transport(local_target) as t:
        t.deploy(make_release(tmp_path / "r1", "r1", 1000), "r1")
        assert (root / ".edgeship-root").is_file()
        # Later, something that is not a release lands under releases/ and staging/ of our root.
        (root / SPEC / "releases" / "keepme").mkdir()
        (root / SPEC / "releases" / "keepme" / "data.bin").write_bytes(b"x" * 10)
        (root / SPEC / "releases" / "r0-not-finalized").mkdir()
        (root / SPEC / "staging" / "notes").mkdir(parents=True, exist_ok=True)
        (root / SPEC / "staging" / "notes" / "todo.txt").write_text("keep")
        for rid in ("r2", "r3", "r4"):
            t.deploy(make_release(tmp_path / rid, rid, 1000), rid)
        assert t.releases() == ["r3", "r4"]  # r1, r2 pruned as releases; the others are not releases
        assert (root / SPEC / "releases" / "keepme" / "data.bin").read_bytes() == b"x" * 10
        assert (root / SPEC / "releases" / "r0-not-finalized").is_dir()
        assert (root / SPEC / "staging" / "notes" / "todo.txt").read_text() == "keep"


def test_root_of_an_older_edgeship_is_claimed_not_refused(local_target: TargetSpec, tmp_path: Path) -> None:
    root = Path(local_target.transport.root)
    # What a root written before the marker (and before per-spec slots) existed looks like.
    old_layout_root(root, [make_release(tmp_path / "A", "A")], "A", ["A"])
    with open_transport(local_target) as t:
        assert t.deploy(make_release(tmp_path / "B", "B"), "B")["previous"] == "A"
        assert t.rollback() == "A"
    assert (root / ".edgeship-root").is_file()
