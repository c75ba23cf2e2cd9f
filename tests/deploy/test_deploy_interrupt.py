"""Ctrl-C / SIGTERM during a deploy (issue 11 #8), through the real console script on ``local``.

While the device agent measures the new release, the signal must: stop the agent's whole process
group on the device, make the previous release current again, and exit 130 with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_helpers import sigint_default
from tests.deploy.cli import EDGESHIP, MNIST, agent_pids, edgeship, env_for, last_line, local_target

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_while_the_agent_measures_restores_the_device(sig: signal.Signals, tmp_path: Path) -> None:
    env = env_for(tmp_path, tmp_path / "stages")
    device = tmp_path / "device"
    first = local_target(tmp_path / "t1", device)
    out = ["--spec", str(MNIST), "--out", str(tmp_path / "build")]
    ok = edgeship(["deploy", "--target", str(first), *out], env)
    assert ok.returncode == 0, ok.stderr
    previous = os.readlink(device / "mnist-cnn" / "current")

    # The same device, a release whose validation takes minutes: the interrupt lands mid-measurement.
    slow = local_target(tmp_path / "t2", device, validation={"warmup": 1, "runs": 5_000_000})
    proc = subprocess.Popen([str(EDGESHIP), "deploy", "--target", str(slow), *out], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if os.readlink(device / "mnist-cnn" / "current") != previous and len(agent_pids(device)) >= 2:
                break  # switched, and the agent's `run` has started its measuring child
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert os.readlink(device / "mnist-cnn" / "current") != previous, "the new release must be current while it is measured"
        measuring = agent_pids(device)
        time.sleep(1.0)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    tail = "\n".join(stderr.splitlines()[-12:])
    assert proc.returncode == 130, tail
    assert os.readlink(device / "mnist-cnn" / "current") == previous, tail
    assert agent_pids(device) == [], f"agent processes left running (were {measuring})"
    assert last_line(stderr).startswith("edgeship: interrupted: cheapdev"), stderr
    assert "rolled back to" in last_line(stderr) and "Traceback" not in stderr
    # The device is usable at once: the lock was released and the restored release validates.
    again = edgeship(["validate", "--target", str(first), *out], env)
    assert again.returncode == 0, again.stderr
