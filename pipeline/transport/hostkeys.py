"""Host keys: edgeship's own known_hosts, fingerprints, and enrolment (``edgeship devices trust``).

Trust is never implicit. Connections load *only* edgeship's known_hosts (not ~/.ssh/known_hosts,
whose entries a user may have accepted blindly) and use a reject policy; a key gets into the file
only through :func:`trust`, after a person confirmed its fingerprint (``--yes`` interactively
checked, or ``--fingerprint SHA256:...`` compared against a value obtained out of band).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from pathlib import Path

import paramiko

from pipeline.errors import DeviceError
from pipeline.spec import Host, TargetSpec

DEFAULT_KNOWN_HOSTS = "~/.edgeship/known_hosts"


def known_hosts_path(target: TargetSpec) -> Path:
    """The known_hosts file this target's connections trust."""
    return Path(os.path.expanduser(target.transport.known_hosts or DEFAULT_KNOWN_HOSTS))


def host_entry(host: Host) -> str:
    """The name a known_hosts line uses for this host (OpenSSH's ``[host]:port`` off port 22)."""
    return host.host if host.port == 22 else f"[{host.host}]:{host.port}"


def address(host: Host) -> str:
    return f"{host.host}:{host.port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint (what ``ssh-keygen -lf`` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_known(path: Path) -> paramiko.HostKeys:
    """Parse a known_hosts file; a missing file is an empty one."""
    keys = paramiko.HostKeys()
    if path.is_file():
        try:
            keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise DeviceError(f"cannot read known_hosts {path}: {exc}; fix or remove the broken line") from None
    return keys


def key_from_line(line: str) -> paramiko.PKey:
    """A public key from an ``ssh-ed25519 AAAA... [comment]`` line."""
    parts = line.split()
    if len(parts) < 2:
        raise DeviceError(f"not a public key line: {line!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (ValueError, paramiko.SSHException) as exc:
        raise DeviceError(f"not a public key line ({exc}): {line[:40]!r}") from None


def fetch_host_key(host: Host, timeout: float) -> paramiko.PKey:
    """The key the server presents, from a key exchange only: no authentication is attempted."""
    try:
        sock = socket.create_connection((host.host, host.port), timeout=timeout)
    except OSError as exc:
        raise DeviceError(f"cannot reach {address(host)} ({exc.strerror or exc}); "
                          "check the device is up and transport.hosts is right") from None
    t = paramiko.Transport(sock)
    t.banner_timeout = timeout
    try:
        t.start_client(timeout=timeout)
        return t.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise DeviceError(f"SSH handshake with {address(host)} failed: {exc}; is it an SSH server?") from None
    finally:
        t.close()


def trust(target: TargetSpec, host: Host, *, expected: str | None = None, yes: bool = False,
          timeout: float | None = None) -> dict[str, str]:
    """Enrol ``host``'s current key in edgeship's known_hosts after an explicit confirmation.

    Args:
        expected: the fingerprint (``SHA256:...``) obtained out of band; the key is written only
            if the device presents exactly this one. Required to *replace* a changed key.
        yes: the caller showed the fingerprint to a person who accepted it (CLI prompt or --yes).

    Returns ``{"host", "fingerprint", "key_type", "status"}`` with status ``enrolled``,
    ``replaced`` or ``already-trusted``.
    """
    path = known_hosts_path(target)
    key = fetch_host_key(host, timeout or target.transport.connect_timeout_s)
    fp = fingerprint(key)
    entry = host_entry(host)
    known = load_known(path)
    current = known.lookup(entry) or {}
    old = current.get(key.get_name())
    info = {"host": entry, "fingerprint": fp, "key_type": key.get_name()}
    if old is not None and old == key:
        return {**info, "status": "already-trusted"}
    if expected is not None and expected.strip() != fp:
        raise DeviceError(f"{address(host)} presents {fp}, not the expected {expected.strip()}; "
                          "do not trust it until you know why")
    if old is not None and expected is None:
        raise DeviceError(f"host key of {address(host)} CHANGED (now {fp}, known {fingerprint(old)}); "
                          f"confirm the new one on the device (ssh-keygen -lf /etc/ssh/ssh_host_{_short(key)}_key.pub) "
                          f"and run `edgeship devices trust {target.name} --fingerprint {fp}`")
    if expected is None and not yes:
        raise DeviceError(f"{address(host)} presents {fp}; not trusted without confirmation: rerun with "
                          f"--fingerprint {fp} after checking it on the device, or --yes")
    # Drop every old key of this host: after a re-enrolment only the confirmed key may pass.
    lines = _lines_without(path, entry)
    lines.append(f"{entry} {key.get_name()} {key.get_base64()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return {**info, "status": "replaced" if current else "enrolled"}


def enrol_public_key(target: TargetSpec, host: Host, key_line: str) -> str:
    """Write a host key obtained out of band (e.g. the simulator's ``host_public_key``).

    This is trust by a channel we control (we created the device), not by the network.
    Returns the fingerprint.
    """
    key = key_from_line(key_line)
    path = known_hosts_path(target)
    lines = _lines_without(path, host_entry(host))
    lines.append(f"{host_entry(host)} {key.get_name()} {key.get_base64()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    os.chmod(path, 0o600)
    return fingerprint(key)


def _lines_without(path: Path, entry: str) -> list[str]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        names = line.split(" ", 1)[0].split(",") if line.strip() and not line.startswith("#") else []
        if entry not in names:
            out.append(line if line.endswith("\n") else line + "\n")
    return out


def _short(key: paramiko.PKey) -> str:
    return {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(key.get_name(), "ecdsa")
