"""``edgeship sim``: up / down / status of the emulated devices (typer sub-app).

Errors propagate as edgeship's typed errors: pipeline.cli.run maps them to the exit code and one
line, for ``edgeship sim`` and ``python -m pipeline.sim`` alike.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

import typer

app = typer.Typer(
    help="Emulated ARM64/x86_64 devices with a real SSH server (QEMU user emulation; needs root).",
    no_args_is_help=True,
)

_SIZE = re.compile(r"^\s*(\d+)\s*([mMgG]?)[iI]?[bB]?\s*$")


def parse_size_mb(text: str) -> int:
    """``64M``, ``64``, ``1G`` -> megabytes.

    Raises:
        typer.BadParameter: Anything else.
    """
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"size like 64M or 1G expected, got {text!r}")
    value = int(match.group(1))
    return value * 1024 if match.group(2).lower() == "g" else value


@app.command()
def up(
    names: Annotated[list[str], typer.Argument(help="Devices to start, e.g. sim-arm64 sim-x86.")],
    install_deps: Annotated[
        bool, typer.Option("--install-deps", help="apt-get install missing host tools.")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the rootfs even if cached.")] = False,
    releases_size: Annotated[str | None, typer.Option(
        "--releases-size", help="Limit /opt/edgeship/releases to a tmpfs of this size (e.g. 64M).")] = None,
) -> None:
    """Build (once, cached) and start devices; print where each one listens."""
    from pipeline import sim

    quota = parse_size_mb(releases_size) if releases_size else None
    # SIGTERM (CI timeouts, `kill`) unwinds like Ctrl-C (pipeline.cli.run turns it into
    # KeyboardInterrupt), so a half build is cleaned up and its debootstrap/pip children killed.
    for name in names:
        started = time.monotonic()
        info = sim.up(name, install_deps=install_deps, rebuild=rebuild, releases_mb=quota)
        typer.echo(f"{info.name}: up at {info.user}@{info.host}:{info.port} ({info.arch}) "
                   f"host key {info.host_key_fingerprint} [{time.monotonic() - started:.1f}s] "
                   f"-> {sim.device_file(name)}")


@app.command()
def down(names: Annotated[list[str], typer.Argument(help="Devices to stop.")]) -> None:
    """Stop devices: sshd and everything running in them, then unmount."""
    from pipeline import sim

    for name in names:
        sim.down(name)
        typer.echo(f"{name}: down")


@app.command()
def status(
    names: Annotated[list[str] | None, typer.Argument(help="Devices (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show state, address, arch (via ssh uname -m), rootfs and host-key fingerprint."""
    from pipeline import sim

    rows = [sim.status(name) for name in (names or sim.known_devices())]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    # Plain aligned columns, not a rich table: fingerprints and paths must stay copyable and
    # unwrapped whatever the terminal width (and in CI logs).
    header = ("DEVICE", "STATE", "ADDRESS", "ARCH", "ROOTFS", "HOST KEY")
    lines = [header] + [
        (str(r["name"]), str(r["state"]), f"{r['address']}:{r['port']}",
         str(r["arch"] or f"({r['expected_arch']})"), str(r["rootfs"]),
         str(r["host_key_fingerprint"] or "-"))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1])
