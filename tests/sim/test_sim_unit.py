"""Pure-logic parts of pipeline.sim: no root, no network, no devices."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from pipeline import sim
from pipeline.sim import host, sshd
from pipeline.sim._proc import _unescape, run
from pipeline.sim.cli import parse_size_mb
from pipeline.sim.config import SPECS, recipe_fingerprint
from pipeline.sim.errors import SimError, SimPrerequisiteError


def test_import_is_light():
    code = (
        "import sys, pipeline.sim, pipeline.sim.cli\n"
        "heavy = [m for m in ('paramiko', 'onnxruntime', 'torch', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == ""


def test_known_devices_and_addresses_are_distinct_loopback():
    assert sim.known_devices() == ["sim-arm64", "sim-x86"]
    addrs = {(s.address, s.port) for s in SPECS.values()}
    assert len(addrs) == len(SPECS)
    assert all(s.address.startswith("127.") for s in SPECS.values())


def test_recipe_fingerprint_differs_per_arch_and_is_stable():
    a, x = SPECS["sim-arm64"], SPECS["sim-x86"]
    assert recipe_fingerprint(a) == recipe_fingerprint(a)
    assert recipe_fingerprint(a) != recipe_fingerprint(x)


def test_deb822_and_one_line_sources(tmp_path, monkeypatch):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "off.sources.disabled").write_text(
        "Types: deb\nURIs: http://ignored.invalid/debian\nSuites: bookworm\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://comment.invalid/\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n")
    monkeypatch.setattr(host, "APT_DIR", tmp_path)
    monkeypatch.delenv("EDGESHIP_SIM_MIRROR", raising=False)
    assert host.debian_mirror() == "http://mirror.invalid/debian"
    one_line = "deb [arch=amd64 signed-by=/k] http://a.invalid/d bookworm main\n"
    assert host._source_entries(one_line, False) == [("http://a.invalid/d", ["bookworm"])]
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(SimPrerequisiteError, match="EDGESHIP_SIM_MIRROR"):
        host.debian_mirror()
    monkeypatch.setenv("EDGESHIP_SIM_MIRROR", "http://override.invalid/debian")
    assert host.debian_mirror() == "http://override.invalid/debian"


def test_pip_config_drops_locations_missing_in_rootfs(tmp_path):
    (tmp_path / "opt/present").mkdir(parents=True)
    text = (
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
        "find-links = /opt/absent\n"
        "extra-index-url = file:///opt/absent/simple\n    file:///opt/present\n    https://idx.invalid/simple\n"
        "[install]\nindex-url = file:///nowhere\n"
    )
    out = host.filtered_pip_config(text, tmp_path)
    assert "cert = /etc/ssl/certs/ca-certificates.crt" in out
    assert "absent" not in out and "nowhere" not in out and "find-links" not in out
    assert "file:///opt/present" in out and "https://idx.invalid/simple" in out


def test_preflight_not_root_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(SimPrerequisiteError) as info:
        host.preflight([SPECS["sim-arm64"]])
    msg = str(info.value)
    assert "\n" not in msg and "root" in msg and "apt-get install -y qemu-user-static" in msg


def test_preflight_missing_tool_names_package(monkeypatch):
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    monkeypatch.setattr(host, "_which", lambda tool: None if tool == "debootstrap" else "/bin/x")
    with pytest.raises(SimPrerequisiteError, match="apt-get install -y debootstrap"):
        host.preflight([SPECS["sim-x86"]])


def test_fingerprint_format_matches_ssh_keygen(tmp_path):
    key = tmp_path / "k"
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("ssh-keygen not installed")
    printed = subprocess.run(["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()[1]
    assert sshd.fingerprint(key.with_suffix(".pub").read_text()) == printed


def test_host_public_key_line_strips_comment(tmp_path):
    pub = tmp_path / "etc/ssh/ssh_host_ed25519_key.pub"
    pub.parent.mkdir(parents=True)
    blob = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"\x00" * 36).decode()
    pub.write_text(f"ssh-ed25519 {blob} root@build\n")
    assert sshd.host_public_key_line(tmp_path) == f"ssh-ed25519 {blob}"
    with pytest.raises(SimError, match="sim up"):
        sshd.host_public_key_line(tmp_path / "missing")


def test_unknown_device_lists_known():
    with pytest.raises(SimError, match="sim-arm64"):
        sim.status("sim-riscv")


def test_size_parsing():
    assert parse_size_mb("64M") == 64
    assert parse_size_mb("64") == 64
    assert parse_size_mb("1G") == 1024
    with pytest.raises(typer.BadParameter):
        parse_size_mb("lots")


def test_run_is_bounded():
    with pytest.raises(SimError, match="timed out"):
        run(["sleep", "30"], timeout=0.5)
    with pytest.raises(SimError, match="exit 3"):
        run(["sh", "-c", "echo why; exit 3"], timeout=10)


def test_mountinfo_unescape():
    assert _unescape(r"/a\040b\011c") == "/a b\tc"


def test_binfmt_disabled_entry_gets_enabled_and_needs_fix_binary_flag(tmp_path, monkeypatch):
    (tmp_path / "register").write_text("")
    entry = tmp_path / "qemu-aarch64"
    entry.write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n")
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        entry.write_text(entry.read_text().replace("disabled", "enabled"))

    monkeypatch.setattr(host, "BINFMT_DIR", tmp_path)
    monkeypatch.setattr(host, "run", fake_run)
    monkeypatch.setattr(host, "host_debian_arch", lambda: "amd64")
    with pytest.raises(SimPrerequisiteError, match="F flag"):
        host.ensure_binfmt(SPECS["sim-arm64"])
    assert calls == [["update-binfmts", "--enable", "qemu-aarch64"]]
    entry.write_text("enabled\nflags: PF\n")
    calls.clear()
    host.ensure_binfmt(SPECS["sim-arm64"])
    host.ensure_binfmt(SPECS["sim-x86"])  # native: nothing to do
    assert calls == []


def test_rebuild_keeps_host_keys(tmp_path):
    from pipeline.sim.rootfs import _keep_host_keys

    old, new = tmp_path / "old", tmp_path / "new"
    for root, text in ((old, "old"), (new, "new")):
        (root / "etc/ssh").mkdir(parents=True)
        (root / "etc/ssh/ssh_host_ed25519_key").write_text(text)
        (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text(text + ".pub")
    _keep_host_keys(old, new)
    assert (new / "etc/ssh/ssh_host_ed25519_key").read_text() == "old"
    assert (new / "etc/ssh/ssh_host_ed25519_key.pub").read_text() == "old.pub"
    _keep_host_keys(tmp_path / "absent", new)  # first build: nothing to carry over
