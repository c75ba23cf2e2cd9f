"""Transports: move a release folder to a device and run the device agent there.

``open_transport(target)`` gives a :class:`Transport` (local or SSH per ``target.transport.kind``)
with one shared release/lock implementation:

    with open_transport(target) as t:
        t.check(target, t.probe())
        with t.lock(wait_s=60):
            info = t.deploy(release_dir, release_id)       # upload, verify on device, switch
            result = t.run_agent(["run", "--release", "."], timeout_s=900)

Everything raised to callers is :class:`pipeline.errors.DeviceError` with a one-line message.
Importing this package does not import Fabric/paramiko; only SSH transports and ``trust`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.transport.fleet import for_each_host
from pipeline.transport.releases import hash_tree, release_files
from pipeline.transport.transport import Transport, open_transport

if TYPE_CHECKING:
    from pipeline.spec import Host, TargetSpec

__all__ = ["Transport", "open_transport", "for_each_host", "hash_tree", "release_files", "trust"]


def trust(target: "TargetSpec", host: "Host", *, expected: str | None = None, yes: bool = False) -> dict[str, Any]:
    """Enrol the next unconfirmed key on the way to a host (a jump host's first) in the target's
    known_hosts (see :func:`pipeline.transport.sshconnect.trust`)."""
    from pipeline.transport import sshconnect

    return sshconnect.trust(target, host, expected=expected, yes=yes)
