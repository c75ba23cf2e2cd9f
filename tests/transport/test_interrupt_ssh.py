"""Ctrl-C during a deploy over real OpenSSH (issue 11 #8): the agent's process group on the device
is stopped (sshd starts it in a session of its own) and the previous release is current again."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline.spec import TargetSpec
from pipeline.transport import open_transport
from tests.cli_helpers import sigint_default
from tests.deploy.cli import EDGESHIP, MNIST, agent_pids, edgeship, env_for, last_line

pytestmark = [pytest.mark.device, pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def _target_file(target: TargetSpec, path: Path, runs: int) -> Path:
    data = target.model_dump(mode="json", exclude_none=True)
    data["validation"] = {"warmup": 1, "runs": runs}
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigint_over_ssh_stops_the_remote_agent_and_rolls_back(ssh_target: Callable[..., TargetSpec],
                                                              tmp_path: Path) -> None:
    target = ssh_target(command_timeout_s=600)
    root = Path(target.transport.root)
    env = env_for(tmp_path, tmp_path / "stages")
    out = ["--spec", str(MNIST), "--out", str(tmp_path / "build")]
    fast = _target_file(target, tmp_path / "fast.yaml", 5)
    ok = edgeship(["deploy", "--target", str(fast), *out], env)
    assert ok.returncode == 0, ok.stderr
    with open_transport(target) as t:
        previous = t.current()

    slow = _target_file(target, tmp_path / "slow.yaml", 5_000_000)
    proc = subprocess.Popen([str(EDGESHIP), "deploy", "--target", str(slow), *out], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (root / "mnist-cnn" / "current").resolve().name != previous and len(agent_pids(root)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None and agent_pids(root), proc.communicate()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    tail = "\n".join(stderr.splitlines()[-12:])
    assert proc.returncode == 130, tail
    assert (root / "mnist-cnn" / "current").resolve().name == previous, tail
    assert agent_pids(root) == [], "the agent kept running on the device after the deploy ended"
    assert last_line(stderr).startswith("edgeship: interrupted: testdev") and "rolled back to" in last_line(stderr)
