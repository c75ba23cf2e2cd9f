"""End-to-end device tests: the emulated devices (``sim_devices``) plus an isolated workspace."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def pytest_configure(config: pytest.Config) -> None:
    """Reuse the simulator's session fixtures (registered once, as tests/sim does)."""
    if not config.pluginmanager.has_plugin("tests.sim.fixtures"):
        config.pluginmanager.import_plugin("tests.sim.fixtures")


@pytest.fixture(scope="session")
def sim_workspace(sim_devices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """Targets ``e2e-<device>`` extending each sim target, trusting exactly the sim's host key.

    The host keys come from the devices' root filesystems (a channel we control), written to a
    test known_hosts; ~/.edgeship/known_hosts is never touched. Builds are limited to ONNX Runtime
    fp32/int8 and few timed runs: timings under emulation are not the point here.
    """
    from tests.sim.fixtures import enroll_known_hosts

    ws = tmp_path_factory.mktemp("e2e")
    known = enroll_known_hosts(ws / "known_hosts", *sim_devices.values())
    targets = ws / "targets"
    targets.mkdir()
    for name in sim_devices:
        (targets / f"e2e-{name}.yaml").write_text(yaml.safe_dump({
            "name": f"e2e-{name}", "extends": name,
            "transport": {"known_hosts": str(known), "connect_timeout_s": 10, "command_timeout_s": 600},
            "builds": [{"backend": "onnxruntime", "precisions": ["fp32", "int8"]}],
            "validation": {"warmup": 1, "runs": 5}}))
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGESHIP_TARGETS_PATH", str(targets))
    mp.setenv("EDGESHIP_STAGE_CACHE", str(ws / "stages"))
    try:
        yield ws
    finally:
        mp.undo()
