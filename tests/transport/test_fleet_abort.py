"""A fleet rollout stops at ``transport.max_failures`` (issue 11, reliability checklist).

Ten hosts over real OpenSSH, one at a time: seven are devices served by one sshd on seven ports
(each port's session gets its own HOME, so each host has its own release store under ``~``), three
are unreachable loopback addresses with nothing listening. After the third failure the rollout
stops: the remaining hosts are never contacted, every host is in the report, the exit is non-zero.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.cli import MNIST, edgeship, env_for
from tests.transport import sshd as sshd_mod

pytestmark = [pytest.mark.device, pytest.mark.slow, pytest.mark.backend("onnxruntime")]

GOOD = 7
#: Host order: g = a device, x = unreachable. The third x is host 7, so hosts 8-10 never start.
ORDER = "ggxgxgxggg"


@pytest.fixture
def fleet_sshd(sshd: sshd_mod.Sshd, tmp_path: Path) -> Iterator[list[tuple[int, Path]]]:
    """The session sshd's keys and config on ``GOOD`` new ports, each with its own HOME: [(port, home)]."""
    ports = [sshd_mod._free_port() for _ in range(GOOD)]
    homes = [tmp_path / f"dev{i}" for i in range(GOOD)]
    config = (sshd.dir / "sshd_config").read_text()
    config = re.sub(r"(?m)^Port .*$", "\n".join(f"Port {p}" for p in ports), config)
    config = re.sub(r"(?m)^PidFile .*$", f"PidFile {tmp_path}/fleet.pid", config)
    config += "".join(f"Match LocalPort {p}\n    SetEnv HOME={h}\n" for p, h in zip(ports, homes))
    (tmp_path / "fleet_config").write_text(config)
    for h in homes:
        h.mkdir()
    proc = subprocess.Popen([sshd_mod.SSHD, "-D", "-E", str(tmp_path / "fleet.log"), "-f",
                             str(tmp_path / "fleet_config")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        for p in ports:
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((sshd_mod.ADDRESS, p), timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
        yield list(zip(ports, homes))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _fleet_target(tmp_path: Path, sshd: sshd_mod.Sshd, devices: list[tuple[int, Path]],
                  max_failures: int | str) -> Path:
    known = tmp_path / "known_hosts"
    good = iter(devices)
    hosts, lines, bad = [], [], 50
    for i, kind in enumerate(ORDER, 1):
        if kind == "g":
            port, _ = next(good)
            hosts.append({"name": f"h{i}", "host": sshd_mod.ADDRESS, "port": port, "key_file": str(sshd.client_key)})
            lines.append(f"[{sshd_mod.ADDRESS}]:{port} {sshd.host_key_line}")
        else:
            hosts.append({"name": f"h{i}", "host": f"127.0.0.{bad}", "port": 9, "key_file": str(sshd.client_key)})
            bad += 1
    known.write_text("\n".join(lines) + "\n")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fleet", "arch": sshd_mod.os.uname().machine,
        "transport": {"kind": "ssh", "root": "~", "python": sys.executable, "known_hosts": str(known),
                      "connect_timeout_s": 5, "command_timeout_s": 300, "parallel": 1,
                      "max_failures": max_failures, "hosts": hosts},
        "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
        "validation": {"warmup": 1, "runs": 5}}))
    return path


@pytest.mark.parametrize("max_failures", [3, "30%"])
def test_rollout_stops_at_the_threshold_with_a_report_per_host(max_failures: int | str, sshd: sshd_mod.Sshd,
                                                               fleet_sshd: list[tuple[int, Path]],
                                                               tmp_path: Path) -> None:
    target = _fleet_target(tmp_path, sshd, fleet_sshd, max_failures)
    out = tmp_path / "results.json"
    res = edgeship(["deploy", "--spec", str(MNIST), "--target", str(target), "--out", str(tmp_path / "build"),
                    "--json", str(out)], env_for(tmp_path, tmp_path / "stages"))
    assert res.returncode == 1, res.stdout + res.stderr  # unreachable hosts: an environment failure
    assert "Traceback" not in res.stderr
    results = json.loads(out.read_text())
    status = {d["device"].split(" ")[0]: d["status"] for d in results["devices"]}
    assert list(status) == [f"h{i}" for i in range(1, 11)]  # every host reported, in order
    assert status == {"h1": "passed", "h2": "passed", "h3": "error", "h4": "passed", "h5": "error",
                      "h6": "passed", "h7": "error", "h8": "not-started", "h9": "not-started", "h10": "not-started"}
    not_started = [d for d in results["devices"] if d["status"] == "not-started"]
    assert all(f"the rollout stopped after 3 of 10 hosts failed (transport.max_failures: {max_failures})"
               in d["error"] for d in not_started)
    assert f"fleet fleet: 3 error, 3 not-started, 4 passed (rollout stopped at transport.max_failures: " \
           f"{max_failures})" in res.stdout + res.stderr
    # Hosts that passed before the threshold keep the release; the ones never started were never touched.
    homes = [home for _, home in fleet_sshd]
    for home in homes[:4]:
        assert (home / "mnist-cnn" / "current").resolve().name == results["release_id"]
    for home in homes[4:]:
        assert list(home.iterdir()) == []
