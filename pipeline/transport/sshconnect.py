"""Open strictly verified SSH connections to a target's host, through its jump hosts when the ssh
config names any (ProxyJump), and enrol host keys along that route (``edgeship devices trust``).

Every hop is a Fabric Connection of its own with the reject policy and only the keys the target's
known_hosts holds for that hop's :attr:`Endpoint.known_name`: a jump host's key is checked exactly
like the device's, and nothing is ever auto-accepted. Each hop gets ``transport.connect_timeout_s``
for its TCP connect, banner, authentication and the forwarded channel to the next hop.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field

import paramiko
from fabric import Config, Connection
from paramiko.ssh_exception import NoValidConnectionsError

from pipeline.errors import DeviceError, SpecError
from pipeline.spec import Host, TargetSpec
from pipeline.transport import hostkeys
from pipeline.transport.sshconfig import Endpoint, resolve

NET_ERRORS = (OSError, EOFError, paramiko.SSHException)


def failure_kind(exc: BaseException, elapsed: float, limit: float) -> str:
    """``"timeout"`` (the peer said nothing in time), ``"closed"`` (it hung up) or ``"other"``.

    paramiko wraps both in the same SSHException ("Error reading SSH protocol banner"); the cause
    it was raised from tells them apart: a timeout, or an EOF/reset when the peer closed the
    connection (sshd's MaxStartups, a tcp wrapper, a service restarting). Without a cause, only
    the clock can: a failure well before the deadline was not a timeout.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; a cycle must not loop forever
        if seen is None:
            break
        if isinstance(seen, (socket.timeout, TimeoutError)):
            return "timeout"
        if isinstance(seen, (EOFError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "closed"
        seen = seen.__cause__ or seen.__context__
    if any(m in str(exc) for m in ("banner", "Timeout", "No existing session")):
        return "timeout" if elapsed >= 0.9 * limit else "closed"
    return "other"


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectUnknown(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising a type we can turn into an actionable message."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname)


def describe(host: Host, ep: Endpoint) -> str:
    """How messages name a host: ``dev (10.0.0.5:22)``, or with an alias or a jump
    ``lab-pi (pi@10.0.0.5:22 via jump bastion)`` / ``dev (lab-pi = pi@10.0.0.5:22 ...)``."""
    if ep.alias == ep.hostname and ep.via is None and not ep.proxy_command:
        return f"{host.name} ({ep.address})"
    return f"{host.name} ({ep.route()})" if host.name == ep.alias else f"{host.name} ({ep.alias} = {ep.route()})"


@dataclass
class Link:
    """An open connection to a host and the jump-host connections it runs through."""

    conn: Connection
    endpoint: Endpoint
    name: str
    gateways: list[Connection] = field(default_factory=list)

    def close(self) -> None:
        # The device's connection first: it runs inside the gateways' channels.
        self.conn.close()
        for gw in reversed(self.gateways):
            gw.close()


def _where(ep: Endpoint, name: str, jump: bool) -> str:
    if jump:
        return f"jump host {ep.alias} ({ep.address}) of {name}"
    return ep.address if ep.alias == ep.hostname else f"{ep.alias} ({ep.address})"


def open_link(target: TargetSpec, host: Host, ep: Endpoint | None = None) -> Link:
    """Connect to ``host`` (``ep``: where :func:`resolve` put it), refusing unknown or changed host
    keys on every hop before authenticating there."""
    ep = ep or resolve(target, host)
    name = describe(host, ep)
    if host.key_file and not os.path.isfile(ep.key_files[0]):
        # A mistake in the target file (exit 2), not a device that does not answer.
        raise SpecError(f"{name}: key_file {ep.key_files[0]} not found; fix transport.hosts[].key_file "
                        f"in {target.source_path or 'the target'}")
    gateways: list[Connection] = []
    try:
        conn = _open(target, ep, name, gateways, jump=False)
    except BaseException:
        for gw in reversed(gateways):
            gw.close()
        raise
    return Link(conn, ep, name, gateways)


def _open(target: TargetSpec, ep: Endpoint, name: str, gateways: list[Connection], *, jump: bool) -> Connection:
    """``ep``'s connection, its jump hosts opened first (each appended to ``gateways``)."""
    return _connect(target, ep, name, route_socket(target, ep, name, gateways), jump=jump)


def route_socket(target: TargetSpec, ep: Endpoint, name: str, gateways: list[Connection]) -> object | None:
    """A socket-like object reaching ``ep`` (a forwarded channel or a ProxyCommand), or None: direct TCP."""
    if ep.via is not None:
        gw = _open(target, ep.via, name, gateways, jump=True)
        gateways.append(gw)
        assert gw.transport is not None
        limit = target.transport.connect_timeout_s
        try:
            return gw.transport.open_channel("direct-tcpip", (ep.hostname, ep.port), ("", 0), timeout=limit)
        except NET_ERRORS as exc:
            raise DeviceError(f"{name}: jump host {ep.via.alias} cannot reach {ep.address} ({exc or type(exc).__name__}); "
                              "is the device up, and does the jump host allow TCP forwarding?") from None
    if ep.proxy_command:
        try:
            return paramiko.ProxyCommand(ep.proxy_command)
        except paramiko.SSHException as exc:
            raise DeviceError(f"{name}: ProxyCommand failed to start ({exc}); check the ssh config") from None
    return None


def _connect(target: TargetSpec, ep: Endpoint, name: str, sock: object | None, *, jump: bool) -> Connection:
    ts = target.transport
    kw: dict = {"look_for_keys": jump and not ep.key_files, "allow_agent": True, "banner_timeout": ts.connect_timeout_s,
                "auth_timeout": ts.connect_timeout_s, "channel_timeout": ts.connect_timeout_s}
    keys = [k for k in ep.key_files if os.path.isfile(k)]  # OpenSSH skips a config IdentityFile that is absent
    if keys:
        kw["key_filename"] = keys
    if sock is not None:
        kw["sock"] = sock
    # The ssh config was applied by resolve(): Fabric must not apply it (or a gateway) again.
    conn = Connection(ep.hostname, user=ep.user, port=ep.port, config=Config(ssh_config=paramiko.SSHConfig()),
                      gateway=False, connect_timeout=max(1, math.ceil(ts.connect_timeout_s)), connect_kwargs=kw)
    # Fabric installs AutoAddPolicy; replace it and trust nothing but this hop's known_hosts keys,
    # filed under the name paramiko checks (the resolved host and port) whatever name they have there.
    conn.client.set_missing_host_key_policy(_RejectUnknown())
    checked = ep.hostname if ep.port == 22 else f"[{ep.hostname}]:{ep.port}"
    for key in hostkeys.trusted_keys(hostkeys.known_hosts_path(target), ep).values():
        conn.client.get_host_keys().add(checked, key.get_name(), key)
    t0 = time.monotonic()
    try:
        conn.open()
    except BaseException as exc:
        conn.close()
        if isinstance(exc, NET_ERRORS):
            raise _connect_error(target, ep, name, exc, time.monotonic() - t0, jump=jump) from None
        raise
    assert conn.transport is not None
    conn.transport.set_keepalive(max(1, int(ts.keepalive_s)))
    return conn


def _connect_error(target: TargetSpec, ep: Endpoint, name: str, exc: BaseException, elapsed: float, *,
                   jump: bool) -> DeviceError:
    """One line for a failed connect to ``ep``, saying which hop and what to do."""
    where, limit = _where(ep, name, jump), target.transport.connect_timeout_s
    who = f"{name}: jump host {ep.alias} ({ep.address})" if jump else name
    if isinstance(exc, _UnknownHostKey):
        return DeviceError(f"host key of {where} is not trusted; run `edgeship devices trust {target.name}` "
                           "to check and enrol its fingerprint")
    if isinstance(exc, paramiko.BadHostKeyException):
        fp = hostkeys.fingerprint(exc.key)
        return DeviceError(f"host key of {where} CHANGED to {fp} (known: {hostkeys.fingerprint(exc.expected_key)}): "
                           "possible man-in-the-middle, nothing was sent; if the device was reinstalled, check the "
                           f"new key on its console and run `edgeship devices trust {target.name} --fingerprint {fp}`")
    if isinstance(exc, paramiko.AuthenticationException):
        return DeviceError(f"{who}: {ep.user} was refused ({exc}); check the key file (key_file or IdentityFile) "
                           "and the authorized_keys there")
    if isinstance(exc, NoValidConnectionsError):
        return DeviceError(f"{who}: connection refused; is sshd running on port {ep.port}?")
    kind = failure_kind(exc, elapsed, limit)
    if kind == "timeout":
        return DeviceError(f"{who}: no SSH answer within {limit:g} s; is the device up (and not frozen)?")
    if kind == "closed":
        return DeviceError(f"{who}: the device closed the connection during the SSH handshake (after {elapsed:.1f} s); "
                           "is sshd overloaded (MaxStartups) or restarting, or does a firewall/tcp wrapper refuse "
                           "this host?")
    return DeviceError(f"{who}: SSH connection failed: {exc or type(exc).__name__}; check the device and the network")


# -- enrolment -----------------------------------------------------------------------------------


def route(ep: Endpoint) -> list[Endpoint]:
    """The hops to ``ep``, outermost jump host first, ``ep`` last."""
    hops = [ep]
    while hops[0].via is not None:
        hops.insert(0, hops[0].via)
    return hops


def pending(target: TargetSpec, host: Host) -> tuple[Endpoint, bool, paramiko.PKey]:
    """The next key to confirm on the way to ``host``: the first jump host whose key is not known
    yet, else the host itself. Returns (endpoint, is_jump_host, the key it presents now)."""
    ep = resolve(target, host)
    known = hostkeys.known_hosts_path(target)
    nxt = next((hop for hop in route(ep)[:-1] if not hostkeys.trusted_keys(known, hop)), ep)
    return nxt, nxt is not ep, fetch_key(target, host, nxt)


def fetch_key(target: TargetSpec, host: Host, ep: Endpoint) -> paramiko.PKey:
    """The key ``ep`` presents (key exchange only), reached through its (already trusted) jump hosts."""
    name, timeout = describe(host, ep), target.transport.connect_timeout_s
    gateways: list[Connection] = []
    try:
        sock = route_socket(target, ep, name, gateways)
        if sock is None:
            try:
                sock = socket.create_connection((ep.hostname, ep.port), timeout=timeout)
            except OSError as exc:
                raise DeviceError(f"cannot reach {ep.address} ({exc.strerror or exc}); "
                                  "check the device is up and transport.hosts is right") from None
        return hostkeys.fetch_host_key(sock, ep, timeout)
    finally:
        for gw in reversed(gateways):
            gw.close()


def trust(target: TargetSpec, host: Host, *, expected: str | None = None, yes: bool = False) -> dict[str, str]:
    """Enrol the next unconfirmed key on the way to ``host`` (a jump host's first, then the host's);
    see :func:`hostkeys.record`. The result's ``jump`` is "yes" when a jump host's key was written."""
    ep, jump, key = pending(target, host)
    out = hostkeys.record(target, ep, key, expected=expected, yes=yes)
    return {**out, "jump": "yes" if jump else "no"}
