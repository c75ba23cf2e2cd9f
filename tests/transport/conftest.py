"""Fixtures for transport tests: a throwaway sshd on 127.0.0.5 and targets pointing at it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # `tests.transport.*` imports from the checkout

from pipeline.spec import TargetSpec  # noqa: E402
from tests.transport import sshd as sshd_mod  # noqa: E402


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_mod.Sshd]:
    """One sshd for the whole session (each test gets its own device root)."""
    reason = sshd_mod.skip_reason()
    if reason:
        pytest.skip(reason)
    server = sshd_mod.start(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_target(sshd: sshd_mod.Sshd, tmp_path: Path) -> Callable[..., TargetSpec]:
    """``ssh_target(**transport_overrides)``: a target for the test sshd with its key enrolled."""
    from pipeline.transport import hostkeys

    def make(trusted: bool = True, **overrides: Any) -> TargetSpec:
        root = overrides.pop("root", tmp_path / "device")
        known = overrides.pop("known_hosts", tmp_path / "known_hosts")
        target = sshd.target(Path(root), Path(known), **overrides)
        if trusted:
            # The key comes from the server's key file (a channel we control), not the network.
            hostkeys.enrol_public_key(target, target.transport.hosts[0], sshd.host_key_line)
        return target

    return make


@pytest.fixture
def local_target(tmp_path: Path) -> TargetSpec:
    """The ``local`` target with its device folder in a temp dir."""
    from pipeline.spec import load_target

    target = load_target("local")
    target.transport.root = str(tmp_path / "local-device")
    return target
