"""The release store never trusts a checksum list alone: damaged files are found, re-uploaded, repaired.

Runs against the ``local`` transport and the loopback sshd (real OpenSSH): the store's device
half is the same program on both, but the SSH run proves the host side passes what is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import open_transport
from tests.transport.helpers import SPEC, make_release

SHARED = "edgeship_agent/measure.py"


def _flip_byte(path: Path) -> None:
    """One flipped bit at rest, as a failing SD card produces (same inode, same size)."""
    with open(path, "r+b") as fh:
        fh.seek(10)
        b = fh.read(1)
        fh.seek(10)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.fixture(params=["local", "ssh"])
def any_target(request: pytest.FixtureRequest, tmp_path: Path) -> TargetSpec:
    if request.param == "local":
        return request.getfixturevalue("local_target")
    make: Callable[..., TargetSpec] = request.getfixturevalue("ssh_target")
    return make(root=tmp_path / "ssh-device")


def test_flipped_byte_in_a_shared_file_redeploy_repairs_and_rollback_works(any_target: TargetSpec,
                                                                           tmp_path: Path) -> None:
    a = make_release(tmp_path / "A", "A", 50_000)
    b = make_release(tmp_path / "B", "B", 60_000)
    root = Path(any_target.transport.root)
    with open_transport(any_target) as t:
        t.deploy(a, "A")
        second = t.deploy(b, "B")
        assert second["linked_files"] > 0
        in_a, in_b = root / SPEC / "releases" / "A" / SHARED, root / SPEC / "releases" / "B" / SHARED
        assert os.stat(in_a).st_ino == os.stat(in_b).st_ino  # one inode, two releases
        _flip_byte(in_b)

        # A rollback to a release holding the bad bytes says which file and what to do.
        with pytest.raises(DeviceError, match=rf"release A is damaged: {SHARED} does not match its recorded "
                                              r"sha256; deploy release A again to repair it \(current: B\)"):
            t.rollback("A")
        assert t.current() == "B"

        # The redeploy re-hashes link candidates: the damaged inode is not linked, it is uploaded.
        fixed = t.deploy(b, "B")
        assert fixed["changed"] and SHARED in [r.split("/", 3)[3] for r in fixed["repaired_files"]]
        assert in_b.read_bytes() == (b / SHARED).read_bytes()
        assert t.current() == "B"

        # ... and release A was repaired from the fresh, verified copy: rollback works again.
        assert t.rollback() == "A"
        assert in_a.read_bytes() == (a / SHARED).read_bytes()
        assert t.run_agent(["probe"], timeout_s=60)["arch"] == os.uname().machine


def test_damaged_file_only_in_an_older_release_is_not_linked(any_target: TargetSpec, tmp_path: Path) -> None:
    """A third release sharing the file with a damaged one gets fresh bytes, not the bad inode."""
    root = Path(any_target.transport.root)
    with open_transport(any_target) as t:
        t.deploy(make_release(tmp_path / "A", "A", 10_000), "A")
        _flip_byte(root / SPEC / "releases" / "A" / SHARED)
        c = make_release(tmp_path / "C", "C", 20_000)
        info = t.deploy(c, "C")  # before the fix: finalize refused it (the damaged inode was linked)
        assert (root / SPEC / "releases" / "C" / SHARED).read_bytes() == (c / SHARED).read_bytes()
        assert info["repaired_files"] == [f"{SPEC}/releases/A/{SHARED}"]
        assert t.rollback("A") == "A"
