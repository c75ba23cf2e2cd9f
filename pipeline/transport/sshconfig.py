"""Where an SSH host really is: the user's OpenSSH client config applied to a target's host entry.

A target's ``hosts[].host`` may be a ``Host`` alias of ``~/.ssh/config`` (or of the file named by
``transport.ssh_config`` / ``$EDGESHIP_SSH_CONFIG``; ``none`` turns reading off). What it gives:
HostName, User, Port, IdentityFile, ProxyJump (a chain of jump hosts, each resolved through the
same config, as OpenSSH does), ProxyCommand and HostKeyAlias.

Precedence: what the target YAML states explicitly (``port``, ``user``, ``key_file``) wins over the
ssh config, which wins over edgeship's defaults (port 22, user root). A jump host's user is its
``user@`` in ProxyJump, else its config User, else the local user (OpenSSH's default).

Nothing here touches the network.
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from pathlib import Path

import paramiko

from pipeline.errors import SpecError
from pipeline.spec import Host, TargetSpec

DEFAULT_SSH_CONFIG = "~/.ssh/config"
ENV = "EDGESHIP_SSH_CONFIG"
_MAX_HOPS = 8  # OpenSSH has no fixed limit; a ProxyJump loop in a config must not recurse forever
_JUMP = re.compile(r"(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\s]+))(?::(?P<port>\d+))?")


@dataclass(frozen=True)
class Endpoint:
    """One SSH server to connect to, resolved; ``via`` is the jump host it is reached through."""

    alias: str  # the name as written (target YAML or ProxyJump)
    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]
    host_key_alias: str | None = None
    via: "Endpoint | None" = None
    proxy_command: str | None = None

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def known_name(self) -> str:
        """The name its key has in known_hosts, as OpenSSH looks it up: HostKeyAlias when set, else
        the resolved HostName (``[host]:port`` off port 22)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def route(self) -> str:
        """``user@host:port`` plus the jump hosts: ``pi@10.0.0.5:22 via jump bastion``."""
        hops, hop = [], self.via
        while hop is not None:
            hops.append(hop.alias)
            hop = hop.via
        how = f" via jump {' <- '.join(hops)}" if hops else (" via ProxyCommand" if self.proxy_command else "")
        return f"{self.user}@{self.address}{how}"


def config_path(target: TargetSpec) -> Path | None:
    """The ssh config file this target reads, or None when reading is turned off."""
    value = target.transport.ssh_config or os.environ.get(ENV) or DEFAULT_SSH_CONFIG
    if value.strip().lower() == "none":
        return None
    return Path(os.path.expanduser(value))


def load_config(target: TargetSpec) -> paramiko.SSHConfig:
    """The parsed ssh config (an empty one when off or when the default file does not exist)."""
    path = config_path(target)
    if path is None:
        return paramiko.SSHConfig()
    if not path.is_file():
        if target.transport.ssh_config:  # named explicitly: a typo must not silently bypass it
            raise SpecError(f"{target.source_path or target.name}: transport.ssh_config: {path} not found; fix the "
                            "path or write 'none' to ignore ssh configs")
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except (OSError, UnicodeDecodeError, paramiko.SSHException) as exc:
        raise SpecError(f"{path}: cannot read this ssh config ({exc}); fix it, or set transport.ssh_config: none "
                        f"in {target.source_path or target.name}") from None


def resolve(target: TargetSpec, host: Host, config: paramiko.SSHConfig | None = None) -> Endpoint:
    """Where ``host`` of ``target`` is, with its jump hosts (explicit YAML fields win)."""
    cfg = load_config(target) if config is None else config
    found = cfg.lookup(host.host)
    given = host.model_fields_set
    keys = (os.path.expanduser(host.key_file),) if host.key_file else tuple(found.get("identityfile", []))
    ep = Endpoint(alias=host.host, hostname=found.get("hostname", host.host),
                  port=host.port if "port" in given else _port(found, host.port, target),
                  user=host.user if "user" in given else found.get("user", host.user),
                  key_files=keys, host_key_alias=found.get("hostkeyalias"))
    return _with_proxy(cfg, ep, found, target, depth=0)


def _port(found: dict, default: int, target: TargetSpec) -> int:
    raw = found.get("port")
    if raw is None:
        return default
    if not str(raw).isdigit() or not 0 < int(raw) < 65536:
        raise SpecError(f"{config_path(target)}: Port {raw!r} is not a port number; fix the ssh config")
    return int(raw)


def _with_proxy(cfg: paramiko.SSHConfig, ep: Endpoint, found: dict, target: TargetSpec, depth: int) -> Endpoint:
    """``ep`` with its ProxyJump chain (or ProxyCommand) from the config attached."""
    jump = found.get("proxyjump", "").strip()
    if jump and jump.lower() != "none":
        via = None
        # ``ProxyJump a,b``: a first, then b through a; b carries the connection to ep.
        for spec in jump.split(","):
            via = _hop(cfg, spec.strip(), via, target, depth + 1)
        return Endpoint(**{**ep.__dict__, "via": via})
    command = found.get("proxycommand", "").strip()
    if command and command.lower() != "none":
        return Endpoint(**{**ep.__dict__, "proxy_command": command})
    return ep


def _hop(cfg: paramiko.SSHConfig, spec: str, prev: Endpoint | None, target: TargetSpec, depth: int) -> Endpoint:
    """One ``[user@]host[:port]`` of a ProxyJump, resolved through the config like any host."""
    m = _JUMP.fullmatch(spec)
    if not m:
        raise SpecError(f"{config_path(target)}: ProxyJump entry {spec!r} is not [user@]host[:port]; fix the ssh config")
    if depth > _MAX_HOPS:
        raise SpecError(f"{config_path(target)}: ProxyJump chain through {spec} is longer than {_MAX_HOPS} hops "
                        "(a loop?); fix the ssh config")
    name = m.group("v6") or m.group("host")
    found = cfg.lookup(name)
    ep = Endpoint(alias=name, hostname=found.get("hostname", name),
                  port=int(m.group("port")) if m.group("port") else _port(found, 22, target),
                  user=m.group("user") or found.get("user") or getpass.getuser(),
                  key_files=tuple(found.get("identityfile", [])), host_key_alias=found.get("hostkeyalias"))
    if prev is not None:  # later hops of one ProxyJump go through the earlier ones (not their own config)
        return Endpoint(**{**ep.__dict__, "via": prev})
    return _with_proxy(cfg, ep, found, target, depth)
