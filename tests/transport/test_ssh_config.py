"""~/.ssh/config on real boards (issue 16): Host aliases, User, Port, IdentityFile, HostKeyAlias and
ProxyJump through two real OpenSSH servers, with host keys as strict as ever.

The session sshd is the jump host (OpenSSH allows TCP forwarding by default); a second sshd with
its own host key and its own client key is the device. The ssh config gives each of them only
through aliases, so a connection that works proves the alias was resolved.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import DeviceError, SpecError
from pipeline.spec import TargetSpec
from pipeline.transport import hostkeys, open_transport, trust
from pipeline.transport.sshconfig import resolve
from tests.transport import sshd as sshd_mod

pytestmark = pytest.mark.device
A = sshd_mod.ADDRESS


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_mod.Sshd]:
    """The board behind the jump host: a second real sshd, its own host and client keys."""
    if sshd_mod.skip_reason():
        pytest.skip(sshd_mod.skip_reason())
    server = sshd_mod.start(tmp_path_factory.mktemp("device-sshd"))
    try:
        yield server
    finally:
        server.stop()


def write_config(tmp_path: Path, jump: sshd_mod.Sshd, dev: sshd_mod.Sshd, extra: str = "") -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(f"""
Host jumpbox
    HostName {A}
    Port {jump.port}
    User root
    IdentityFile {jump.client_key}

Host lab-dev
    HostName {A}
    Port {dev.port}
    User root
    IdentityFile {dev.client_key}

Host lab-far
    HostName {A}
    Port {dev.port}
    User root
    IdentityFile {dev.client_key}
    ProxyJump jumpbox
    HostKeyAlias lab-far-key
{extra}""")
    return path


def target_for(jump: sshd_mod.Sshd, tmp_path: Path, host: dict[str, Any], **transport: Any) -> TargetSpec:
    dev = transport.pop("dev")
    if "ssh_config" not in transport:
        transport["ssh_config"] = str(write_config(tmp_path, jump, dev))
    return jump.target(tmp_path / "device-root", transport.pop("known_hosts", tmp_path / "known_hosts"),
                       hosts=[{"name": "board", **host}], **transport)


def enrol(known: Path, name: str, server: sshd_mod.Sshd) -> None:
    with known.open("a") as fh:
        fh.write(f"{name} {' '.join(server.host_key_line.split()[:2])}\n")


def forwards(server: sshd_mod.Sshd, port: int) -> int:
    """direct-tcpip requests towards ``port`` the server has logged (OpenSSH, LogLevel DEBUG1)."""
    return len(re.findall(rf"server_request_direct_tcpip: originator .*, target {re.escape(A)} port {port}\b",
                          server.log.read_text(errors="replace")))


def whoami(target: TargetSpec) -> tuple[str, str]:
    with open_transport(target) as t:
        r = t.executor.run("id -un; echo $SSH_CONNECTION", 30)
        return r.out, t.executor.name


def test_alias_gives_hostname_port_user_and_identity_file(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                          tmp_path: Path) -> None:
    # The YAML names only the alias: no port, no user, no key_file.
    target = target_for(sshd, tmp_path, {"host": "lab-dev"}, dev=device)
    enrol(tmp_path / "known_hosts", f"[{A}]:{device.port}", device)
    out, name = whoami(target)
    assert out.split()[0] == "root" and f"{A} {device.port}" in out  # SSH_CONNECTION ends in server addr, port
    assert name == f"board (lab-dev = root@{A}:{device.port})"


def test_proxyjump_goes_through_the_jump_host_and_hostkeyalias_names_the_key(
        sshd: sshd_mod.Sshd, device: sshd_mod.Sshd, tmp_path: Path) -> None:
    target = target_for(sshd, tmp_path, {"host": "lab-far"}, dev=device)
    known = tmp_path / "known_hosts"
    enrol(known, f"[{A}]:{sshd.port}", sshd)
    enrol(known, "lab-far-key", device)  # OpenSSH files it under HostKeyAlias, not under host:port
    before = forwards(sshd, device.port)
    out, name = whoami(target)
    assert out.split()[0] == "root"
    assert forwards(sshd, device.port) == before + 1, "the jump host forwarded no connection to the device"
    assert name == f"board (lab-far = root@{A}:{device.port} via jump jumpbox)"

    # The same key under host:port only is not what OpenSSH would look up with HostKeyAlias set.
    known.write_text("")
    enrol(known, f"[{A}]:{sshd.port}", sshd)
    enrol(known, f"[{A}]:{device.port}", device)
    with pytest.raises(DeviceError, match=rf"^host key of lab-far \({re.escape(A)}:{device.port}\) is not trusted; "
                                          r"run `edgeship devices trust test-ssh`"):
        open_transport(target)


def test_unknown_jump_host_key_is_refused_before_anything_is_sent(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                                   tmp_path: Path) -> None:
    target = target_for(sshd, tmp_path, {"host": "lab-far"}, dev=device)
    enrol(tmp_path / "known_hosts", "lab-far-key", device)  # the device is known, the jump host is not
    auths_jump, auths_dev = sshd.userauth_requests(), device.userauth_requests()
    with pytest.raises(DeviceError) as err:
        open_transport(target)
    assert str(err.value) == (f"host key of jump host jumpbox ({A}:{sshd.port}) of board (lab-far = root@{A}:"
                              f"{device.port} via jump jumpbox) is not trusted; run `edgeship devices trust test-ssh` "
                              "to check and enrol its fingerprint")
    time.sleep(0.3)
    assert (sshd.userauth_requests(), device.userauth_requests()) == (auths_jump, auths_dev)

    # A key the jump host does not have is a changed key, refused just the same.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with (tmp_path / "known_hosts").open("a") as fh:
        fh.write(f"[{A}]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(DeviceError, match=r"host key of jump host jumpbox .* CHANGED to SHA256:\S+ .*possible man-in"):
        open_transport(target)


def test_trust_enrols_the_jump_host_first_then_the_device(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                          tmp_path: Path) -> None:
    target = target_for(sshd, tmp_path, {"host": "lab-far"}, dev=device)
    host = target.transport.hosts[0]
    jump_fp = hostkeys.fingerprint(hostkeys.key_from_line(sshd.host_key_line))
    dev_fp = hostkeys.fingerprint(hostkeys.key_from_line(device.host_key_line))
    with pytest.raises(DeviceError, match=rf"jumpbox \({re.escape(A)}:{sshd.port}\) presents {re.escape(jump_fp)}"):
        trust(target, host, expected=dev_fp)  # the device's fingerprint does not confirm the jump host
    assert trust(target, host, expected=jump_fp) == {"host": f"[{A}]:{sshd.port}", "fingerprint": jump_fp,
                                                     "key_type": "ssh-ed25519", "status": "enrolled", "jump": "yes"}
    first = trust(target, host, expected=dev_fp)  # fetched through the now trusted jump host
    assert (first["host"], first["status"], first["jump"]) == ("lab-far-key", "enrolled", "no")
    assert whoami(target)[0].split()[0] == "root"


def test_user_known_hosts_is_read_hashed_and_never_written(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    user_known = home / ".ssh" / "known_hosts"
    enrol(user_known, f"[{A}]:{device.port}", device)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(user_known)], check=True, capture_output=True)
    hashed = user_known.read_text()
    assert hashed.startswith("|1|")  # as OpenSSH writes it with HashKnownHosts
    target = target_for(sshd, tmp_path, {"host": "lab-dev"}, dev=device, known_hosts="~/.ssh/known_hosts")
    assert whoami(target)[0].split()[0] == "root"
    # Edgeship's own file was neither read nor created; the user's file is untouched.
    assert not (home / ".edgeship" / "known_hosts").exists() and user_known.read_text() == hashed
    with pytest.raises(DeviceError, match=r"known_hosts is OpenSSH's: edgeship reads it but never writes it"):
        hostkeys.enrol_public_key(target, target.transport.hosts[0], sshd.host_key_line)
    with pytest.raises(DeviceError, match=r"known_hosts is OpenSSH's"):
        trust(target, target.transport.hosts[0].model_copy(update={"host": "jumpbox"}), yes=True)
    assert user_known.read_text() == hashed
    # @revoked wins over the entry that trusts the key.
    user_known.write_text(hashed + f"@revoked * {' '.join(device.host_key_line.split()[:2])}\n")
    with pytest.raises(DeviceError, match="is not trusted"):
        open_transport(target)


def test_explicit_target_fields_win_over_the_ssh_config(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                        tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((A, 0))
        dead = s.getsockname()[1]  # closed again: nothing listens there
    wrong = f"\nHost lab-wrong\n    HostName {A}\n    Port {dead}\n    User nobody\n    IdentityFile {sshd.client_key}\n"
    cfg = write_config(tmp_path, sshd, device, extra=wrong)
    enrol(tmp_path / "known_hosts", f"[{A}]:{device.port}", device)
    from_config = target_for(sshd, tmp_path, {"host": "lab-wrong"}, dev=device, ssh_config=str(cfg))
    with pytest.raises(DeviceError, match=rf"connection refused; is sshd running on port {dead}\?"):
        open_transport(from_config)  # the config applies where the YAML is silent
    explicit = target_for(sshd, tmp_path, {"host": "lab-wrong", "port": device.port, "user": "root",
                                           "key_file": str(device.client_key)}, dev=device, ssh_config=str(cfg))
    out, name = whoami(explicit)
    assert out.split()[0] == "root" and name == f"board (lab-wrong = root@{A}:{device.port})"
    # 'none' turns the config off: the alias is then only a host name.
    off = target_for(sshd, tmp_path, {"host": "lab-dev"}, dev=device, ssh_config="none")
    ep = resolve(off, off.transport.hosts[0])
    assert (ep.hostname, ep.port, ep.user, ep.key_files, ep.via) == ("lab-dev", 22, "root", (), None)


def test_silent_jump_host_fails_within_the_connect_deadline(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                            tmp_path: Path) -> None:
    with socket.socket() as srv:
        srv.bind((A, 0))
        srv.listen(1)  # accepts, never speaks
        extra = f"\nHost lab-stuck\n    HostName {A}\n    Port {device.port}\n    ProxyJump root@{A}:{srv.getsockname()[1]}\n"
        cfg = write_config(tmp_path, sshd, device, extra=extra)
        target = target_for(sshd, tmp_path, {"host": "lab-stuck"}, dev=device, ssh_config=str(cfg),
                            connect_timeout_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=rf"board \(lab-stuck = root@{re.escape(A)}:{device.port} via jump "
                                              rf"{re.escape(A)}\): jump host .* no SSH answer within 1.5 s"):
            open_transport(target)
        assert 1.4 <= time.monotonic() - t0 < 10


def test_a_missing_or_broken_ssh_config_is_a_target_mistake(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                            tmp_path: Path) -> None:
    missing = target_for(sshd, tmp_path, {"host": "lab-dev"}, dev=device, ssh_config=str(tmp_path / "nope"))
    with pytest.raises(SpecError, match=r"transport.ssh_config: .*nope not found; fix the path or write 'none'"):
        open_transport(missing)
    broken = tmp_path / "broken_config"
    broken.write_text("Host lab-dev\n    ProxyJump jumpbox\nHost jumpbox\n    ProxyJump lab-dev\n")
    looping = target_for(sshd, tmp_path, {"host": "lab-dev"}, dev=device, ssh_config=str(broken))
    with pytest.raises(SpecError, match=r"ProxyJump chain through \S+ is longer than 8 hops \(a loop\?\)"):
        open_transport(looping)


def test_proxycommand_from_the_config_carries_the_connection(sshd: sshd_mod.Sshd, device: sshd_mod.Sshd,
                                                             tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    enrol(known, f"[{A}]:{sshd.port}", sshd)
    enrol(known, f"[{A}]:{device.port}", device)
    # OpenSSH's own client as the ProxyCommand, as strict as edgeship (its known_hosts, no TOFU).
    via = (f"ssh -F none -i {sshd.client_key} -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes "
           f"-o BatchMode=yes -p {sshd.port} -W %h:%p root@{A}")
    extra = f"\nHost lab-cmd\n    HostName {A}\n    Port {device.port}\n    ProxyCommand {via}\n"
    cfg = write_config(tmp_path, sshd, device, extra=extra)
    target = target_for(sshd, tmp_path, {"host": "lab-cmd", "key_file": str(device.client_key)}, dev=device,
                        ssh_config=str(cfg))
    before = forwards(sshd, device.port)
    out, name = whoami(target)
    assert out.split()[0] == "root" and name == f"board (lab-cmd = root@{A}:{device.port} via ProxyCommand)"
    assert forwards(sshd, device.port) == before + 1, "the ProxyCommand's ssh -W forwarded no connection"
