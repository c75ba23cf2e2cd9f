"""Host keys: the known_hosts file a target trusts, fingerprints, and writing confirmed keys.

Trust is never implicit. Connections trust *only* the target's known_hosts (edgeship's own
~/.edgeship/known_hosts by default, not ~/.ssh/known_hosts, whose entries a user may have accepted
blindly) and use a reject policy; a key gets into edgeship's file only through
:func:`record`, after a person confirmed its fingerprint (``--yes`` interactively checked, or
``--fingerprint SHA256:...`` compared against a value obtained out of band). A known_hosts under
~/.ssh (``transport.known_hosts: ~/.ssh/known_hosts``) is OpenSSH's: read, never written.

Keys are looked up under :attr:`Endpoint.known_name` (HostKeyAlias, else the resolved HostName,
``[host]:port`` off port 22), as OpenSSH does; hashed names work, ``@revoked`` lines revoke.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import paramiko

from pipeline.errors import DeviceError
from pipeline.spec import Host, TargetSpec
from pipeline.transport.sshconfig import Endpoint, resolve

DEFAULT_KNOWN_HOSTS = "~/.edgeship/known_hosts"


def known_hosts_path(target: TargetSpec) -> Path:
    """The known_hosts file this target's connections trust."""
    return Path(os.path.expanduser(target.transport.known_hosts or DEFAULT_KNOWN_HOSTS))


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint (what ``ssh-keygen -lf`` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_known(path: Path) -> tuple[paramiko.HostKeys, list[paramiko.PKey]]:
    """The keys of a known_hosts file and its ``@revoked`` keys; a missing file is an empty one.

    ``@cert-authority`` lines are skipped (host certificates are not supported: such a host's
    key is then unknown, and refused).
    """
    keys, revoked = paramiko.HostKeys(), []
    if not path.is_file():
        return keys, revoked
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DeviceError(f"cannot read known_hosts {path}: {exc.strerror or exc}; check its permissions") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker, _, rest = line.partition(" ") if line.startswith("@") else ("", "", line)
        if marker not in ("", "@revoked"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(rest.strip(), lineno)
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError) as exc:
            raise DeviceError(f"cannot read known_hosts {path} line {lineno}: {exc}; fix or remove the broken line") from None
        if entry is None or entry.key is None:
            continue
        if marker:
            revoked.append(entry.key)
        else:
            for name in entry.hostnames:  # hashed names (|1|...) match too
                keys.add(name, entry.key.get_name(), entry.key)
    return keys, revoked


def trusted_keys(path: Path, ep: Endpoint) -> dict[str, paramiko.PKey]:
    """The keys ``ep`` may present (key type -> key): its known_hosts entries minus revoked keys."""
    keys, revoked = load_known(path)
    found = keys.lookup(ep.known_name) or {}
    return {kind: key for kind, key in found.items() if key not in revoked}


def key_from_line(line: str) -> paramiko.PKey:
    """A public key from an ``ssh-ed25519 AAAA... [comment]`` line."""
    parts = line.split()
    if len(parts) < 2:
        raise DeviceError(f"not a public key line: {line!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (ValueError, paramiko.SSHException) as exc:
        raise DeviceError(f"not a public key line ({exc}): {line[:40]!r}") from None


def fetch_host_key(sock: object, ep: Endpoint, timeout: float) -> paramiko.PKey:
    """The key the server on ``sock`` presents, from a key exchange only: no authentication."""
    t = paramiko.Transport(sock)
    t.banner_timeout = timeout
    try:
        t.start_client(timeout=timeout)
        return t.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise DeviceError(f"SSH handshake with {ep.alias} ({ep.address}) failed: {exc}; is it an SSH server?") from None
    finally:
        t.close()


def record(target: TargetSpec, ep: Endpoint, key: paramiko.PKey, *, expected: str | None = None,
           yes: bool = False) -> dict[str, str]:
    """Write ``key`` as ``ep``'s key in the target's known_hosts after an explicit confirmation.

    Args:
        expected: the fingerprint (``SHA256:...``) obtained out of band; the key is written only
            if it is exactly this one. Required to *replace* a changed key.
        yes: the caller showed the fingerprint to a person who accepted it (CLI prompt or --yes).

    Returns ``{"host", "fingerprint", "key_type", "status"}`` with status ``enrolled``,
    ``replaced`` or ``already-trusted``.
    """
    path = known_hosts_path(target)
    fp = fingerprint(key)
    entry = ep.known_name
    current = trusted_keys(path, ep)
    old = current.get(key.get_name())
    info = {"host": entry, "fingerprint": fp, "key_type": key.get_name()}
    if old is not None and old == key:
        return {**info, "status": "already-trusted"}
    where = f"{ep.alias} ({ep.address})"
    if expected is not None and expected.strip() != fp:
        raise DeviceError(f"{where} presents {fp}, not the expected {expected.strip()}; "
                          "do not trust it until you know why")
    if old is not None and expected is None:
        raise DeviceError(f"host key of {where} CHANGED (now {fp}, known {fingerprint(old)}); "
                          f"confirm the new one on the device (ssh-keygen -lf /etc/ssh/ssh_host_{_short(key)}_key.pub) "
                          f"and run `edgeship devices trust {target.name} --fingerprint {fp}`")
    if expected is None and not yes:
        raise DeviceError(f"{where} presents {fp}; not trusted without confirmation: rerun with "
                          f"--fingerprint {fp} after checking it on the device, or --yes")
    _write_entry(target, path, entry, key)
    return {**info, "status": "replaced" if current else "enrolled"}


def _write_entry(target: TargetSpec, path: Path, entry: str, key: paramiko.PKey) -> None:
    """Replace every key of ``entry`` by ``key``: after a re-enrolment only the confirmed key may pass."""
    ssh_dir = Path(os.path.expanduser("~/.ssh")).resolve()
    if path.resolve().is_relative_to(ssh_dir):
        raise DeviceError(f"{path} is OpenSSH's: edgeship reads it but never writes it; add {entry}'s key with ssh "
                          f"(connect once and compare the fingerprint), or drop transport.known_hosts from "
                          f"{target.source_path or target.name} to use edgeship's own file")
    lines = _lines_without(path, entry)
    lines.append(f"{entry} {key.get_name()} {key.get_base64()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def enrol_public_key(target: TargetSpec, host: Host, key_line: str) -> str:
    """Write a host key obtained out of band (e.g. the simulator's ``host_public_key``).

    This is trust by a channel we control (we created the device), not by the network.
    Returns the fingerprint.
    """
    key = key_from_line(key_line)
    _write_entry(target, known_hosts_path(target), resolve(target, host).known_name, key)
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
