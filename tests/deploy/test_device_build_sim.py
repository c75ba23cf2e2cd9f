"""Build on the device, for real over SSH on the emulated devices (issue 14).

- ONNX Runtime's opt-in ``optimize_on_device``: the agent saves the session's fully optimised
  graph for the device's CPU into the engine cache and the runner loads it; a second deploy builds
  nothing (proven by the cached file's sha256 and mtime on the device, not by the message).
- The issue's "done": ``edgeship deploy --spec examples/mnist.yaml --target X`` with X extending
  ``jetson`` and pointing at sim-arm64 (no TensorRT there, none on this host either) builds here,
  deploys, measures and gates the ONNX Runtime builds on the device, and reports every TensorRT
  run as failed on the device with the agent's reason: exit 3, not a refusal on the host.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main
from pipeline.spec import load_target
from pipeline.transport import open_transport
from tests.deploy.cli import EDGESHIP, MNIST, last_line, small_spec

pytestmark = [pytest.mark.device, pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def _target(ws: Path, name: str, data: dict[str, Any]) -> str:
    """A target file in the workspace's targets folder (EDGESHIP_TARGETS_PATH), trusting the sims."""
    data = {"name": name, **data}
    data.setdefault("transport", {}).update({"known_hosts": str(ws / "known_hosts"), "connect_timeout_s": 10,
                                             "command_timeout_s": 900})
    (ws / "targets" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return name


def _on_device(target: str, path: str) -> tuple[str, int]:
    """sha256 and mtime (ns) of a file on the device, read there by the device's python."""
    code = ("import hashlib, os, sys; p = sys.argv[1]; "
            "print(hashlib.sha256(open(p, 'rb').read()).hexdigest(), os.stat(p).st_mtime_ns)")
    with open_transport(load_target(target)) as t:
        r = t.executor.run(f"{t.agent_python} -c \"{code}\" {path}", 60)
    assert r.rc == 0, r.tail()
    sha, mtime = r.out.split()
    return sha, int(mtime)


@pytest.mark.parametrize("device", ["sim-x86", "sim-arm64"])
def test_onnxruntime_optimized_on_device_is_cached_and_gated(sim_workspace: Path, device: str,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    name = _target(sim_workspace, f"odb-{device}", {
        "extends": device, "validation": {"warmup": 1, "runs": 5},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32", "int8"],
                    "options": {"optimize_on_device": True}}]})
    with open_transport(load_target(name)) as t, t.lock(wait_s=120):
        t.executor.run(f"rm -rf {t.root}/engines", 60)  # a fresh cache: the first deploy must build
    out = sim_workspace / f"odb-{device}.json"
    args = ["deploy", "--spec", str(small_spec(sim_workspace)), "--target", name,
            "--out", str(sim_workspace / "build-odb"), "--json", str(out)]
    first_code = main(args)
    first = json.loads(out.read_text())
    assert first_code == (0 if first["gate"]["passed"] else 3)
    runs = {r["id"]: r for r in first["runs"]}
    assert set(runs) == {"onnxruntime-fp32", "onnxruntime-int8"}
    for r in runs.values():  # measured from the optimised file, and gated like any run
        assert r["error"] is None and r["accuracy"] > 90 and r["latency_ms"]["runs"] == 5
        b = r["device_build"]
        assert b["artifact"] == "model.optimized.onnx" and b["path"].startswith("/opt/edgeship/engines/")
        assert b["identity"]["arch"] == first["devices"][0]["device_info"]["arch"]
    before = {rid: _on_device(name, r["device_build"]["path"]) for rid, r in runs.items()}
    assert not any(r["device_build"]["cached"] for r in runs.values())
    capfd.readouterr()

    again_code = main(args)
    again = json.loads(out.read_text())
    assert again_code == first_code  # (the release may differ, e.g. a newer agent: the cache is per model)
    assert "engine cached" in capfd.readouterr().err
    for r in again["runs"]:
        assert r["device_build"]["cached"] is True and r["device_build"]["key"] == runs[r["id"]]["device_build"]["key"]
        assert _on_device(name, r["device_build"]["path"]) == before[r["id"]]  # same bytes, never rewritten
        assert r["accuracy"] == runs[r["id"]]["accuracy"]


def test_jetson_target_on_a_board_without_tensorrt(sim_workspace: Path) -> None:
    """The issue's done: the host builds the jetson target without TensorRT, the TensorRT runs fail
    on the device with the agent's reason, ONNX Runtime is measured and gated there; exit 3."""
    sim = load_target("sim-arm64")
    name = _target(sim_workspace, "jetson-on-sim", {
        "extends": "jetson",
        "hardware": {"l4t": None},  # an emulated aarch64 board has no L4T to check
        "transport": {"hosts": [h.model_dump(mode="json", exclude_none=True) for h in sim.transport.hosts],
                      "root": sim.transport.root, "python": sim.transport.python},
        "runtime": {"packages": dict(sim.runtime.packages)},  # the sim's venv, not JetPack's pins
        "validation": {"warmup": 1, "runs": 5, "samples": 300}})
    out = sim_workspace / "jetson-on-sim.json"
    proc = subprocess.run([str(EDGESHIP), "deploy", "--spec", str(MNIST), "--target", name,
                           "--out", str(sim_workspace / "build-jetson"), "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 3, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    [dev] = res["devices"]
    assert dev["error"] is None and dev["status"] == "failed"
    runs = {r["id"]: r for r in res["runs"]}
    assert set(runs) == {"tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8", "onnxruntime-fp32", "onnxruntime-int8"}
    reason = (f"tensorrt is not installed on {dev['device_info']['hostname']} (python {sim.transport.python}); "
              "JetPack 6 ships it")
    for rid in ("tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"):
        assert runs[rid]["error"].startswith(reason), runs[rid]["error"]
        assert runs[rid]["gate"]["passed"] is False
    for rid in ("onnxruntime-fp32", "onnxruntime-int8"):
        assert runs[rid]["error"] is None and runs[rid]["accuracy"] > 90 and runs[rid]["latency_ms"]["runs"] == 5
        assert "gate" in runs[rid]
    assert runs["onnxruntime-fp32"]["gate"]["passed"] is True
    assert any("tensorrt-int8" in r for r in res["gate"]["reasons"])
    # The gate's verdict is printed once, with the device's reason (no extra error line after it).
    console = proc.stdout + proc.stderr
    assert "gate: FAILED" in console and "edgeship: error:" not in console
    assert any("tensorrt-int8" in line and "not installed" in line for line in console.splitlines()), console[-2000:]


def test_doctor_over_ssh_names_what_the_emulated_board_lacks(sim_workspace: Path) -> None:
    """The agent travels with the command (nothing deployed needed, nothing left behind)."""
    proc = subprocess.run([str(EDGESHIP), "devices", "doctor", "e2e-sim-x86"], capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("sim-x86: ")]
    assert [ln.split()[1] for ln in lines] == ["tensorrt", "cuda", "gpu", "power", "clocks"], proc.stderr
    assert "MISSING tensorrt is not installed on " in lines[0] and "(python /opt/edgeship/venv/bin/python)" in lines[0]
    assert "MISSING no CUDA driver on " in lines[1]
    assert proc.returncode == 1 and "missing on e2e-sim-x86: sim-x86 tensorrt, sim-x86 cuda" in last_line(proc.stderr)
    with open_transport(load_target("e2e-sim-x86")) as t:
        left = t.executor.run("ls /tmp/tmp.*/agent.zip 2>/dev/null || true", 30).out.strip()
    assert left == "", f"doctor left its agent on the device: {left}"
