"""Releases are kept per spec on a device (issue 16): slots, and the one-time migration of a root
written by the old layout (releases/ and current at the top), through the real console script."""

from __future__ import annotations

import os
from pathlib import Path

from tests.deploy.cli import edgeship, last_line, local_target
from tests.transport.helpers import make_release, old_layout_root


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EDGESHIP_STAGE_CACHE": str(tmp_path / "stages"), "COLUMNS": "200"}


def test_old_layout_root_is_migrated_once_by_the_spec_its_manifests_name(tmp_path: Path) -> None:
    device = tmp_path / "device"
    made = tmp_path / "made"
    x1, x2 = make_release(made / "X1", "X1", spec="alpha"), make_release(made / "X2", "X2", spec="alpha")
    y1 = make_release(made / "Y1", "Y1", spec="beta")
    old_layout_root(device, [x1, x2, y1], current="X2", history=["X1", "Y1", "X1", "X2"])
    target = local_target(tmp_path, device)
    env = _env(tmp_path)

    listed = edgeship(["devices", "releases", str(target)], env)
    assert listed.returncode == 0, listed.stderr
    # Each release went under the spec its manifest names; the old top-level layout is gone.
    assert sorted(p.name for p in (device / "alpha" / "releases").iterdir()) == ["X1", "X2"]
    assert sorted(p.name for p in (device / "beta" / "releases").iterdir()) == ["Y1"]
    assert os.readlink(device / "alpha" / "current") == "releases/X2"
    assert not (device / "beta" / "current").exists()  # Y1 was not current: beta has nothing current
    for old in ("releases", "current", "history", "staging"):
        assert not os.path.lexists(device / old), old
    assert (device / "alpha" / "history").read_text().split()[1::2] == ["X1", "X1", "X2"]
    assert (device / ".edgeship-root").is_file()  # claimed, and the lock stays one per device root

    out = listed.stdout
    assert out.index("alpha") < out.index("X2") < out.index("X1") < out.index("beta") < out.index("Y1")
    assert "beta (nothing current)" in out and "gate not recorded" in out

    again = edgeship(["devices", "releases", str(target)], env)  # once: a second listing changes nothing
    assert again.returncode == 0 and again.stdout == out

    # Rollback is per spec: alpha's previous is X1, beta's is its own Y1, never the other spec's.
    many = edgeship(["rollback", str(target)], env)
    assert many.returncode == 1 and "holds releases of 2 specs (alpha, beta); name one with --spec" in last_line(many.stderr)
    back = edgeship(["rollback", str(target), "--spec", "alpha"], env)
    assert back.returncode == 0, back.stderr
    assert "current of alpha is now X1" in back.stdout
    assert os.readlink(device / "alpha" / "current") == "releases/X1"
    beta = edgeship(["rollback", str(target), "--spec", "beta"], env)
    assert beta.returncode == 0 and os.readlink(device / "beta" / "current") == "releases/Y1"
    assert os.readlink(device / "alpha" / "current") == "releases/X1"


def test_a_spec_named_like_an_edgeship_folder_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import SpecError
    from pipeline.transport.releases import release_spec

    folder = make_release(tmp_path / "E", "E", spec="engines")
    try:
        release_spec(folder)
    except SpecError as exc:
        assert "spec name 'engines' is a folder edgeship keeps at the top of transport.root" in str(exc)
    else:
        raise AssertionError("a spec named 'engines' would mix its releases with the device's engine cache")
