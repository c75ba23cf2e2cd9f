"""The host side: preflight checks, optional apt install, binfmt_misc, apt mirror and pip config.

Nothing here names a mirror or registry: both are read from this machine's own apt sources and
pip configuration at run time, so the devices use whatever the host is set up to reach.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import shutil
from pathlib import Path

from pipeline.sim._proc import run
from pipeline.sim.config import DEBIAN_SUITE, INSTALL_HINT, SimSpec
from pipeline.sim.errors import SimPrerequisiteError

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
APT_DIR = Path("/etc/apt")
#: Host tool -> Debian package that provides it.
TOOL_PACKAGES = {
    "debootstrap": "debootstrap",
    "chroot": "coreutils",
    "mount": "mount",
    "umount": "mount",
    "ssh-keygen": "openssh-client",
}
QEMU_PACKAGES = {"update-binfmts": "binfmt-support"}
#: pip options whose values are locations (index URLs, find-links folders).
PIP_LOCATION_KEYS = ("index-url", "extra-index-url", "find-links")


def host_debian_arch() -> str:
    """The host's Debian architecture (amd64, arm64, ...), from the kernel's machine name."""
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def needs_qemu(spec: SimSpec) -> bool:
    """True when ``spec``'s architecture differs from the host's (user emulation needed)."""
    return spec.debian_arch != host_debian_arch()


def _which(tool: str) -> str | None:
    # A non-root PATH often lacks the sbin folders where debootstrap and update-binfmts live.
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


def missing_packages(specs: list[SimSpec]) -> list[str]:
    """Debian packages to install so that every tool ``specs`` need is present."""
    wanted = dict(TOOL_PACKAGES)
    for spec in specs:
        if needs_qemu(spec) and spec.qemu:
            wanted[f"{spec.qemu}-static"] = "qemu-user-static"
            wanted.update(QEMU_PACKAGES)
    return sorted({pkg for tool, pkg in wanted.items() if _which(tool) is None})


def preflight(specs: list[SimSpec], install_deps: bool = False) -> None:
    """Check root and host tools; install missing ones with apt only when ``install_deps``.

    Raises:
        SimPrerequisiteError: Not root, or tools missing (and not installing them).
    """
    if os.geteuid() != 0:
        raise SimPrerequisiteError(
            "emulated devices need root (debootstrap, chroot, mount): run as root, "
            f"with the tools from: {INSTALL_HINT}"
        )
    missing = missing_packages(specs)
    if not missing:
        return
    if not install_deps:
        raise SimPrerequisiteError(
            f"missing host packages {', '.join(missing)}: run `apt-get install -y {' '.join(missing)}` "
            "(or pass --install-deps)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(install, timeout=900, env=env, check=False).returncode != 0:
        # Most often the package lists are missing or stale (fresh containers): refresh once.
        run(["apt-get", "update", "-q"], timeout=600, env=env, what="apt-get update")
        run(install, timeout=900, env=env, what="apt-get install")
    still = missing_packages(specs)
    if still:
        raise SimPrerequisiteError(f"apt-get installed but tools still missing: {', '.join(still)}")


def ensure_binfmt(spec: SimSpec) -> None:
    """Make foreign ELF binaries of ``spec``'s architecture run through qemu, even in a chroot.

    Raises:
        SimPrerequisiteError: binfmt_misc cannot be mounted or the qemu entry enabled, or the
            entry lacks the F (fix-binary) flag that lets the interpreter work inside a chroot.
    """
    if not needs_qemu(spec) or spec.qemu is None:
        return
    if not (BINFMT_DIR / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], timeout=30,
            what="mount binfmt_misc")
    entry = BINFMT_DIR / spec.qemu
    # The entry's first line is "enabled" or "disabled" (so no substring test).
    if not entry.exists() or entry.read_text().splitlines()[:1] != ["enabled"]:
        run(["update-binfmts", "--enable", spec.qemu], timeout=60, what="update-binfmts")
    if not entry.exists():
        raise SimPrerequisiteError(
            f"binfmt entry {spec.qemu} missing after update-binfmts: "
            "apt-get install -y qemu-user-static binfmt-support"
        )
    flags = next((ln.split(":", 1)[1] for ln in entry.read_text().splitlines()
                  if ln.startswith("flags:")), "")
    if "F" not in flags:
        raise SimPrerequisiteError(
            f"binfmt entry {spec.qemu} lacks the F flag, so qemu cannot run inside a chroot: "
            "use Debian's qemu-user-static (it registers with F)"
        )


def _source_entries(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) for each enabled binary ('deb') source in one apt sources file."""
    entries: list[tuple[str, list[str]]] = []
    if not deb822:
        for line in text.splitlines():
            # One-line format: deb [options] URI SUITE COMPONENT...
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
        return entries
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        entries.extend((uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split())
    return entries


def debian_mirror() -> str:
    """The Debian mirror apt uses here for the device's suite (``$EDGESHIP_SIM_MIRROR`` wins).

    Raises:
        SimPrerequisiteError: No enabled apt source serves the suite.
    """
    override = os.environ.get("EDGESHIP_SIM_MIRROR")
    if override:
        return override
    files = [APT_DIR / "sources.list", *sorted((APT_DIR / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in (".list", ".sources"):
            continue  # apt itself ignores other suffixes (e.g. *.disabled)
        for uri, suites in _source_entries(path.read_text(), path.suffix == ".sources"):
            if DEBIAN_SUITE in suites and uri.startswith(("http://", "https://")):
                return uri
    raise SimPrerequisiteError(
        f"no apt source serves Debian {DEBIAN_SUITE}; set EDGESHIP_SIM_MIRROR to a Debian mirror URL"
    )


def host_pip_configs() -> dict[str, Path]:
    """Host pip config files that exist, keyed by where they go in the rootfs."""
    home = Path.home()
    candidates = {
        "/etc/pip.conf": [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")],
        "/root/.config/pip/pip.conf": [home / ".config/pip/pip.conf", home / ".pip/pip.conf"],
    }
    found = {}
    for dest, paths in candidates.items():
        for path in paths:
            if path.is_file():
                found[dest] = path
                break
    return found


def _location_exists(root: Path, location: str) -> bool:
    if location.startswith("file://"):
        location = location[len("file://"):]
    elif "://" in location:
        return True  # a network index: keep it
    return (root / location.lstrip("/")).exists()


def filtered_pip_config(text: str, root: Path) -> str:
    """``text`` minus local index/find-links locations that do not exist inside ``root``.

    The host's pip config may point at wheel folders or file:// indexes on the host; inside
    the chroot they do not exist and pip would warn on every call (or fail, for index-url).
    """
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    for section in parser.sections():
        for key in PIP_LOCATION_KEYS:
            if not parser.has_option(section, key):
                continue
            kept = [loc for loc in parser.get(section, key).split() if _location_exists(root, loc)]
            if kept:
                parser.set(section, key, "\n".join(kept))
            else:
                parser.remove_option(section, key)
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()
