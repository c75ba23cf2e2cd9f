"""Build -> deploy -> validate on the emulated devices over real SSH, and device faults end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import sim
from pipeline.cli import main
from pipeline.errors import DeviceError
from pipeline.spec import load_target
from pipeline.transport import open_transport
from tests.deploy.cli import small_spec
from tests.transport.helpers import SPEC, make_release

MiB = 1 << 20
pytestmark = [pytest.mark.device, pytest.mark.slow, pytest.mark.backend("onnxruntime")]


@pytest.mark.parametrize("device", ["sim-x86", "sim-arm64"])
def test_deploy_validate_on_emulated_device(sim_workspace: Path, device: str) -> None:
    out = sim_workspace / f"results-{device}.json"
    # --no-rollback: this test is about shipping and running, not about the accuracy gate on 300 digits.
    args = ["deploy", "--spec", str(small_spec(sim_workspace)), "--target", f"e2e-{device}",
            "--out", str(sim_workspace / "build"), "--json", str(out), "--no-rollback"]
    assert main(args) in (0, 3)  # 3: the gate refused, which is not this test's business
    res = json.loads(out.read_text())
    [dev] = res["devices"]
    assert dev["error"] is None and dev["device_info"]["arch"] == sim.device_info(device).arch
    assert {r["precision"] for r in res["runs"]} == {"fp32", "int8"}
    assert all(r["accuracy"] > 90 and r["latency_ms"]["runs"] == 5 for r in res["runs"])
    # The emulated board has no power sensor and says so (power null, the estimate labelled as
    # one); its clocks and load are read from what the chroot shows.
    assert all(r["power"] is None for r in res["runs"])
    assert dev["conditions"]["before"]["cpus"] and "flags" in dev["conditions"]
    target = load_target(f"e2e-{device}")
    with open_transport(target) as t:
        assert t.current(res["spec"]) == res["release_id"]  # the spec's own slot on a shared device
        assert json.loads(t.read_current_manifest(res["spec"]))["release_id"] == res["release_id"]

    # Unchanged: the second deploy moves no bytes and keeps the same release current.
    assert main(args) in (0, 3)
    again = json.loads(out.read_text())
    assert again["release_id"] == res["release_id"]
    assert again["devices"][0]["deploy"]["bytes_moved"] == 0


def test_full_device_disk_is_a_clean_error(sim_workspace: Path, tmp_path: Path) -> None:
    device = "sim-x86"
    target = load_target(f"e2e-{device}")
    with open_transport(target) as t:
        before = t.current(SPEC)
        small = t.deploy(make_release(tmp_path / "small", f"small-{os.getpid()}", 256 * 1024),
                         f"small-{os.getpid()}")
        used = sum(d["bytes"] for d in t.slot(SPEC)["details"])
    quota_mb = used // MiB + 3
    # The spec's releases/ becomes a small tmpfs: a nearly full card
    sim.set_releases_quota(device, quota_mb, spec=SPEC)
    try:
        with open_transport(target) as t:
            with pytest.raises(DeviceError, match=r"needs \d+\.\d MiB more under /opt/edgeship but only"):
                t.deploy(make_release(tmp_path / "big", "big", (quota_mb + 4) * MiB), "big")
            assert t.current(SPEC) == small["release_id"]
            assert t.run_agent(["probe"], timeout_s=120, spec=SPEC)["arch"]  # the old release still works
    finally:
        sim.set_releases_quota(device, None, spec=SPEC)
    if before is not None:
        with open_transport(target) as t:
            t.rollback(before, spec=SPEC)  # leave the shared device as we found it


def test_frozen_device_is_a_device_error_within_deadline(sim_workspace: Path) -> None:
    device = "sim-x86"
    target = load_target(f"e2e-{device}")
    target.transport.connect_timeout_s = 3
    with open_transport(target) as t:
        sim.freeze(device)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"did not (answer|finish) within"):
                t.run_agent(["probe"], timeout_s=5)
            assert time.monotonic() - t0 < 5 + 5 + 2
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match=r"no SSH answer within 3 s"):
                open_transport(target)
            assert time.monotonic() - t0 < 3 + 3
        finally:
            sim.thaw(device)
    with open_transport(target) as t:
        assert t.probe()["arch"] == "x86_64"


def test_arch_mismatch_refused(sim_workspace: Path) -> None:
    arm = load_target("e2e-sim-arm64")
    x86 = sim.device_info("sim-x86")
    arm.transport.hosts[0].host, arm.transport.hosts[0].port = x86.host, x86.port
    arm.transport.hosts[0].name = "x86-in-disguise"
    with open_transport(arm) as t, pytest.raises(DeviceError) as err:
        t.check(arm, t.probe())
    assert str(err.value).startswith(f"target e2e-sim-arm64 expects aarch64 but host {x86.host} is x86_64")
