"""``edgeship devices ...`` / ``edgeship rollback`` through typer, against the test sshd."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import hostkeys, open_transport
from pipeline.transport.cli import devices_app, rollback
from tests.transport.helpers import make_release
from tests.transport.sshd import Sshd

app = typer.Typer()
app.add_typer(devices_app, name="devices")
app.command("rollback")(rollback)


def _target_file(target: TargetSpec, path: Path) -> Path:
    path.write_text(yaml.safe_dump(target.model_dump(mode="json", exclude_none=True)))
    return path


@pytest.mark.device
def test_trust_probe_releases_rollback_cli(sshd: Sshd, ssh_target: Callable[..., TargetSpec], tmp_path: Path) -> None:
    runner = CliRunner()
    target = ssh_target(trusted=False)
    tfile = _target_file(target, tmp_path / "test-ssh.yaml")
    fp = hostkeys.fingerprint(hostkeys.key_from_line(sshd.host_key_line))

    res = runner.invoke(app, ["devices", "trust", str(tfile)])  # no TTY, no confirmation
    assert isinstance(res.exception, DeviceError) and "not trusted without confirmation" in str(res.exception)
    assert fp in res.output and not Path(target.transport.known_hosts).exists()
    res = runner.invoke(app, ["devices", "trust", str(tfile), "--fingerprint", fp])
    assert res.exit_code == 0 and f"enrolled ssh-ed25519 {fp}" in res.output

    res = runner.invoke(app, ["devices", "probe", str(tfile)])
    assert res.exit_code == 0, res.output
    assert f"fits {target.name}: yes" in res.output

    with open_transport(target) as t:
        t.deploy(make_release(tmp_path / "A", "A"), "A")
        t.deploy(make_release(tmp_path / "B", "B"), "B")
    res = runner.invoke(app, ["devices", "releases", str(tfile)])
    assert res.exit_code == 0 and "* B" in res.output and "- A" in res.output
    res = runner.invoke(app, ["rollback", str(tfile)])
    assert res.exit_code == 0 and "current is now A" in res.output
    res = runner.invoke(app, ["rollback", str(tfile), "--to", "nope"])
    assert isinstance(res.exception, DeviceError) and "release nope is not on the device" in str(res.exception)


def test_devices_list_shows_trust_without_network() -> None:
    res = CliRunner().invoke(app, ["devices", "list"])
    assert res.exit_code == 0, res.output
    assert "sim-arm64" in res.output and "root@127.0.0.2:2222" in res.output
    assert "local" in res.output
