"""The emulated devices for real: sshd, arch, runtime venv, cache reuse, faults. Needs root."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import sim
from pipeline.sim.config import rootfs_path
from pipeline.sim.rootfs import read_stamp
from tests.sim.fixtures import enroll_known_hosts, run_remote, ssh_client

pytestmark = pytest.mark.device
paramiko = pytest.importorskip("paramiko")


@pytest.mark.parametrize(("name", "machine"), [("sim-arm64", "aarch64"), ("sim-x86", "x86_64")])
def test_ssh_uname_with_enrolled_host_key(sim_devices, tmp_path, name, machine):
    info = sim_devices[name]
    client = ssh_client(info, enroll_known_hosts(tmp_path / "known_hosts", info))
    try:
        assert run_remote(client, "uname -m", timeout=30) == (0, machine + "\n", "")
    finally:
        client.close()


def test_unknown_host_key_is_rejected(sim_devices, tmp_path):
    info = sim_devices["sim-x86"]
    other = sim_devices["sim-arm64"]
    # A known_hosts that lists a different key for this address must not let us in.
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{info.host}]:{info.port} {sim.host_public_key(other.name)}\n")
    with pytest.raises(paramiko.SSHException):
        ssh_client(info, wrong).close()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException):
        ssh_client(info, empty).close()


def test_fingerprint_matches_ssh_keygen(sim_devices, tmp_path):
    for name, info in sim_devices.items():
        pub = tmp_path / f"{name}.pub"
        pub.write_text(sim.host_public_key(name) + "\n")
        printed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()[1]
        assert info.host_key_fingerprint == printed == sim.status(name)["host_key_fingerprint"]
        assert sim.device_info(name) == info


def _tiny_model(path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnxruntime_runs_tiny_model_on_arm64(sim_devices, tmp_path):
    info = sim_devices["sim-arm64"]
    model = tmp_path / "tiny.onnx"
    _tiny_model(model)
    script = (
        "import json, numpy as np, onnxruntime as ort, platform\n"
        "s = ort.InferenceSession('/tmp/edgeship-tiny.onnx', providers=['CPUExecutionProvider'])\n"
        "x = np.array([[1, -2, 3], [0.5, 0.25, -1]], dtype=np.float32)\n"
        "print(json.dumps({'y': s.run(None, {'x': x})[0].tolist(), 'm': platform.machine(),"
        " 'ort': ort.__version__}))\n"
    )
    client = ssh_client(info, enroll_known_hosts(tmp_path / "known_hosts", info))
    try:
        with client.open_sftp() as sftp:
            sftp.put(str(model), "/tmp/edgeship-tiny.onnx")
            with sftp.open("/tmp/edgeship-tiny.py", "w") as fh:
                fh.write(script)
        code, out, err = run_remote(client, f"{info.python} /tmp/edgeship-tiny.py", timeout=180)
    finally:
        client.close()
    assert code == 0, err
    import json

    result = json.loads(out.strip().splitlines()[-1])
    x = np.array([[1, -2, 3], [0.5, 0.25, -1]], dtype=np.float32)
    expected = np.maximum(x @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 10), 0)
    assert result["m"] == "aarch64"
    assert result["ort"] == "1.32.0"
    np.testing.assert_allclose(np.array(result["y"]), expected, rtol=1e-5, atol=1e-6)


# The CPU features a program on the device sees: AT_HWCAP (type 16) from its own auxiliary vector,
# which qemu-user builds from the CPU model it emulates.
_HWCAP_SCRIPT = (
    "import struct; a = open('/proc/self/auxv', 'rb').read(); "
    "print(dict(struct.iter_unpack('<QQ', a)).get(16, 0))"
)
_HWCAP_ASIMD, _HWCAP_ASIMDDP, _HWCAP_SVE = 1 << 1, 1 << 20, 1 << 22


def test_arm64_sessions_see_a_cortex_a72(sim_devices, tmp_path):
    """The Pi 4's CPU, not qemu's `max`: NEON but no dot product or SVE, so runtimes pick the
    kernels a Pi 4 runs (with `max`, ONNX Runtime's int8 took its dot-product kernels, which
    qemu emulates ~10x slower, and int8 timed 7x slower than fp32)."""
    info = sim_devices["sim-arm64"]
    client = ssh_client(info, enroll_known_hosts(tmp_path / "known_hosts", info))
    try:
        code, out, err = run_remote(client, f'{info.python} -c "{_HWCAP_SCRIPT}"; echo $QEMU_CPU', timeout=60)
    finally:
        client.close()
    assert code == 0, err
    hwcap, cpu = out.split()
    assert cpu == "cortex-a72"
    assert int(hwcap) & _HWCAP_ASIMD
    assert not int(hwcap) & (_HWCAP_ASIMDDP | _HWCAP_SVE)


def test_runtime_venv_has_every_runtime(sim_devices, tmp_path):
    info = sim_devices["sim-x86"]
    client = ssh_client(info, enroll_known_hosts(tmp_path / "known_hosts", info))
    try:
        imports = "import numpy, onnxruntime, ai_edge_litert, ncnn; print(numpy.__version__)"
        code, out, err = run_remote(client, f"{info.python} -c '{imports}'")
    finally:
        client.close()
    assert code == 0, err
    assert out.strip() == "2.4.6"


@pytest.mark.parametrize("name", ["sim-x86", "sim-arm64"])
def test_down_then_up_reuses_cached_rootfs(sim_devices, name):
    built_before = read_stamp(rootfs_path(name))
    sim.down(name)
    assert sim.status(name)["state"] == "down"
    started = time.monotonic()
    info = sim.up(name)
    elapsed = time.monotonic() - started
    assert read_stamp(rootfs_path(name)) == built_before  # same rootfs, not rebuilt
    assert elapsed < 60, f"cached up took {elapsed:.1f}s"
    assert info == sim_devices[name]
    state = sim.status(name)
    assert state["state"] == "up"
    assert state["arch"] == info.arch


def test_freeze_hangs_device_and_thaw_recovers(sim_devices, tmp_path):
    info = sim_devices["sim-x86"]
    known = enroll_known_hosts(tmp_path / "known_hosts", info)
    sim.freeze(info.name)
    try:
        assert sim.status(info.name)["state"] == "frozen"
        started = time.monotonic()
        with pytest.raises((paramiko.SSHException, OSError, EOFError)):
            ssh_client(info, known, timeout=3).close()
        assert time.monotonic() - started < 30
    finally:
        sim.thaw(info.name)
    client = ssh_client(info, known)
    try:
        assert run_remote(client, "echo ok", timeout=30)[1] == "ok\n"
    finally:
        client.close()


def test_releases_quota_makes_disk_full(sim_devices, tmp_path):
    info = sim_devices["sim-x86"]
    known = enroll_known_hosts(tmp_path / "known_hosts", info)
    releases = f"{info.root}/releases"
    client = ssh_client(info, known)
    try:
        assert run_remote(client, f"mkdir -p {releases}/r1 && echo keep > {releases}/r1/marker")[0] == 0
        sim.set_releases_quota(info.name, 8)
        assert sim.status(info.name)["releases_quota_mb"] == 8
        code, _, err = run_remote(client, f"head -c 16M /dev/zero > {releases}/big")
        assert code != 0 and "No space left" in err
        assert run_remote(client, f"cat {releases}/r1/marker")[1] == "keep\n"
        run_remote(client, f"rm -f {releases}/big")
        sim.set_releases_quota(info.name, None)
        assert sim.status(info.name)["releases_quota_mb"] is None
        assert run_remote(client, f"cat {releases}/r1/marker")[1] == "keep\n"
    finally:
        sim.set_releases_quota(info.name, None)
        run_remote(client, f"rm -rf {releases}/r1 {releases}/big")
        client.close()
