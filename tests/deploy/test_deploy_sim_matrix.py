"""Issue-level checks on the emulated devices (real sshd, real Fabric, real runtimes):

* every backend x precision gives the same accuracy on the emulated aarch64 device as on the host;
* a model that fails the gate on the device is rolled back automatically;
* a fleet of both emulated devices is deployed in parallel with a per-device report, and a dead
  host in the fleet makes the deploy fail with that host's reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.spec import load_target
from pipeline.transport import open_transport

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "examples" / "mnist.yaml"
pytestmark = [pytest.mark.device, pytest.mark.slow]
ALL_BUILDS = [{"backend": b, "precisions": ["fp32", "fp16", "int8"]} for b in ("onnxruntime", "tflite", "ncnn")]
SAMPLES = 150  # one digit = 0.67 pp; under QEMU one inference costs ~0.1 s


def _target(ws: Path, name: str, data: dict) -> str:
    (ws / "targets" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **data}))
    return name


def _deploy(ws: Path, target: str, spec: Path = MNIST, *extra: str) -> tuple[int, dict]:
    out = ws / f"results-{target}-{spec.stem}.json"
    rc = main(["deploy", "--spec", str(spec), "--target", target, "--out", str(ws / "build" / target / spec.stem),
               "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.backend("onnxruntime")
@pytest.mark.backend("tflite")
@pytest.mark.backend("ncnn")
def test_arm64_accuracy_matches_host_for_every_backend_and_precision(sim_workspace: Path) -> None:
    known = str(sim_workspace / "known_hosts")
    validation = {"warmup": 1, "runs": 5, "samples": SAMPLES}
    host = _target(sim_workspace, "m-host", {"extends": "local", "builds": ALL_BUILDS, "validation": validation,
                                             "transport": {"root": str(sim_workspace / "hostdev")}})
    arm = _target(sim_workspace, "m-arm", {"extends": "sim-arm64", "builds": ALL_BUILDS, "validation": validation,
                                           "threads": 2, "transport": {"known_hosts": known}})
    rc_host, on_host = _deploy(sim_workspace, host)
    rc_arm, on_arm = _deploy(sim_workspace, arm)
    assert rc_host == 0 and rc_arm == 0, (on_host.get("gate"), on_arm.get("gate"))
    assert on_arm["devices"][0]["device_info"]["arch"] == "aarch64"
    # The same artifacts went to both (conversion is cached and arch-independent).
    assert {r["id"]: r["artifact_sha256"] for r in on_host["runs"]} == {r["id"]: r["artifact_sha256"] for r in on_arm["runs"]}
    host_rows = {r["id"]: r for r in on_host["runs"]}
    assert len(host_rows) == 9
    for row in on_arm["runs"]:
        ref = host_rows[row["id"]]
        tol = 0.7 if row["precision"] == "int8" else 0.0  # int8 kernels differ by arch: at most 1 digit
        assert abs(row["accuracy"] - ref["accuracy"]) <= tol + 1e-9, (row["id"], row["accuracy"], ref["accuracy"])
        assert row["top1_agreement"] >= 98.0
        assert row["latency_ms"]["runs"] == 5 and row["latency_ms"]["p50"] > 0  # measured there, by the agent


@pytest.mark.backend("onnxruntime")
def test_gate_failure_on_device_rolls_back(sim_workspace: Path, tmp_path: Path) -> None:
    known = str(sim_workspace / "known_hosts")
    target = _target(sim_workspace, "m-rollback", {
        "extends": "sim-x86", "transport": {"known_hosts": known},
        "builds": [{"backend": "onnxruntime", "precisions": ["int8"]}],
        "validation": {"warmup": 1, "runs": 5, "samples": 300}})
    rc, good = _deploy(sim_workspace, target)
    assert rc == 0
    noise = np.random.default_rng(0).normal(0, 0.01, size=(64, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "noise.npz", x=noise)
    spec = yaml.safe_load(MNIST.read_text())
    spec["calibration"].update({"source": {"kind": "npz", "path": str(tmp_path / "noise.npz")},
                                "method": "minmax", "fallback": False})
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(spec))
    rc, bad = _deploy(sim_workspace, target, broken)
    assert rc == 3 and bad["gate"]["passed"] is False
    dev = bad["devices"][0]
    assert dev["rolled_back"] is True and dev["rolled_back_to"] == good["release_id"]
    with open_transport(load_target(target)) as t:
        assert t.current(good["spec"]) == good["release_id"]
        assert bad["release_id"] in t.releases(good["spec"])  # kept for inspection, not current


@pytest.mark.backend("onnxruntime")
def test_fleet_of_both_devices_in_parallel_with_a_dead_host(sim_workspace: Path, sim_devices) -> None:
    known = str(sim_workspace / "known_hosts")
    x86, arm = sim_devices["sim-x86"], sim_devices["sim-arm64"]
    key = str(Path(x86.key_file))
    hosts = [{"name": "fleet-x86", "host": x86.host, "port": x86.port, "user": "root", "key_file": key},
             {"name": "fleet-arm64", "host": arm.host, "port": arm.port, "user": "root", "key_file": key,
              "arch": "aarch64"}]
    common = {"extends": "sim-x86", "builds": [{"backend": "onnxruntime", "precisions": ["int8"]}],
              "validation": {"warmup": 1, "runs": 5, "samples": 150}}
    fleet = _target(sim_workspace, "m-fleet", {**common, "transport": {"known_hosts": known, "hosts": hosts,
                                                                       "parallel": 2}})
    rc, res = _deploy(sim_workspace, fleet)
    assert rc == 0, res.get("gate")
    devices = {d["device"]: d for d in res["devices"]}
    assert set(devices) == {"fleet-x86", "fleet-arm64"}
    assert devices["fleet-arm64"]["device_info"]["arch"] == "aarch64"
    assert devices["fleet-x86"]["device_info"]["arch"] == "x86_64"
    for d in devices.values():
        assert d["gate"]["passed"] and d["runs"][0]["accuracy"] > 90
    a, b = devices["fleet-x86"], devices["fleet-arm64"]
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # ran at the same time

    dead = {"name": "fleet-dead", "host": "127.0.0.9", "port": 2299, "user": "root", "key_file": key}
    broken = _target(sim_workspace, "m-fleet-dead", {**common, "transport": {
        "known_hosts": known, "hosts": [*hosts, dead], "parallel": 3, "connect_timeout_s": 5}})
    rc, res = _deploy(sim_workspace, broken)
    assert rc == 1  # a device could not be measured: not a gate verdict, but a failure
    devices = {d["device"]: d for d in res["devices"]}
    assert devices["fleet-dead"]["error"] and "127.0.0.9" in devices["fleet-dead"]["error"]
    assert devices["fleet-x86"]["gate"]["passed"] and devices["fleet-arm64"]["gate"]["passed"]
