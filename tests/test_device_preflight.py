"""Check the device before the build (issue 16, "Real boards"), through the console script: an
unreachable device, a missing key file and a shipped example's placeholder host each fail in about
a second with one line naming the fix, before any stage runs."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import EDGESHIP, MNIST

pytestmark = [pytest.mark.backend("onnxruntime")]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def ssh_target(tmp_path: Path, key_file: Path, port: int) -> Path:
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({
        "extends": "local", "name": "board",
        "transport": {"kind": "ssh", "hosts": [{"name": "board", "host": "127.0.0.1", "port": port,
                                                "user": "pi", "key_file": str(key_file)}]},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}]}))
    return path


def deploy(tmp_path: Path, target: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "EDGESHIP_STAGE_CACHE": str(tmp_path / "stages"), "COLUMNS": "200"}
    t0 = time.monotonic()
    proc = subprocess.run([str(EDGESHIP), "deploy", "--spec", str(MNIST), "--target", target,
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, time.monotonic() - t0


def assert_nothing_built(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> str:
    assert not (tmp_path / "stages").exists()  # no stage ran, so none wrote its cache entry
    assert "export" not in proc.stderr and not list((tmp_path / "out").glob("release*"))
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, proc.stderr
    return err[0]


def test_unreachable_device_fails_before_the_build(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("not used: the connection is refused first\n")
    proc, seconds = deploy(tmp_path, str(ssh_target(tmp_path, key, unused_port())))
    line = assert_nothing_built(tmp_path, proc)
    assert proc.returncode == 1
    assert "connection refused; is sshd running on port" in line
    assert seconds < 8  # the MNIST build alone takes longer than this on any machine


def test_missing_key_file_is_a_target_mistake(tmp_path: Path) -> None:
    proc, _ = deploy(tmp_path, str(ssh_target(tmp_path, tmp_path / "no-such-key", unused_port())))
    line = assert_nothing_built(tmp_path, proc)
    assert proc.returncode == 2
    assert f"key_file {tmp_path / 'no-such-key'} not found; fix transport.hosts[].key_file" in line


def test_shipped_example_with_its_placeholder_host(tmp_path: Path) -> None:
    proc, _ = deploy(tmp_path, "rpi4")
    line = assert_nothing_built(tmp_path, proc)
    assert proc.returncode == 2
    assert "raspberrypi.local is the shipped example's placeholder; copy targets/rpi4.yaml and set transport.hosts" in line
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: jetson\nname: mine\n")  # inherits the placeholder host: same refusal
    proc, _ = deploy(tmp_path, str(mine))
    assert proc.returncode == 2 and f"set transport.hosts in {mine}" in assert_nothing_built(tmp_path, proc)


def test_device_check_names_the_ssh_config_alias_and_its_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = unused_port()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host lab-pi\n    HostName 127.0.0.1\n    Port {port}\n    User pi\n")
    monkeypatch.setenv("EDGESHIP_SSH_CONFIG", str(config))  # the test's stand-in for ~/.ssh/config
    target = tmp_path / "board.yaml"
    target.write_text(yaml.safe_dump({  # only the alias: port and user come from the ssh config
        "extends": "local", "name": "board", "transport": {"kind": "ssh", "hosts": [{"name": "board", "host": "lab-pi"}]},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}]}))
    proc, seconds = deploy(tmp_path, str(target))
    line = assert_nothing_built(tmp_path, proc)
    assert proc.returncode == 1 and seconds < 8
    assert f"board (lab-pi = pi@127.0.0.1:{port}): connection refused; is sshd running on port {port}?" in line
