"""Build the edgeship image, or reuse it when nothing that goes into it has changed.

The image is tagged by a content hash: the build context exactly as the builder sees it (the
files .dockerignore lets through, with their modes), the build args and the base image's id.
If an image with that tag exists it is reused, so a test run or `make docker-image` with nothing
changed costs a hash of the context, not a build.

    .venv/bin/python docker/edgeship_image.py                 # prints the image tag
    .venv/bin/python docker/edgeship_image.py --tag edgeship:dev --tag edgeship:latest
    .venv/bin/python docker/edgeship_image.py --stage-wheels  # only stage local wheels

Needs the Docker SDK (`docker`, in the dev extra) and a running engine (docker/start-dockerd.sh).
The base image is, in order: $EDGESHIP_BASE_IMAGE; python:3.11-slim-bookworm if it is local or
can be pulled; else a Debian base built here by docker/make-base-image.sh (no registry needed).
Wheels that pip's local find-links hold for versions pinned in constraints.txt (here: the CPU
torch wheel) are hard-linked into docker/wheels/ first, so the image gets the same builds as the
host venv instead of PyPI's CUDA torch.

Note: this folder is not a Python package (no __init__.py, on purpose: a `docker` package here
would shadow the Docker SDK). Tests load this file by path.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"
WHEELS_DIR = DOCKER_DIR / "wheels"
DEFAULT_BASE = "python:3.11-slim-bookworm"
IMAGE_REPO = "edgeship"


class ImageBuildError(RuntimeError):
    """The image build failed; the message carries the tail of the build log."""


def engine() -> tuple[object | None, str]:
    """A pinged Docker client, or None and one line saying why not."""
    try:
        import docker  # the SDK; imported here so that --help works without it
    except ImportError as exc:
        return None, f"Docker SDK not installed: {exc}"
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine", reported as is
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return None, f"no Docker engine answers: {lines[0]}"
    return client, ""


# ---------------------------------------------------------------------------------------------
# local wheels


def _pip_find_links() -> list[Path]:
    """Local folders pip uses as find-links on this machine (env and config files)."""
    values: list[str] = []
    values += os.environ.get("PIP_FIND_LINKS", "").split()
    files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf",
             os.path.expanduser("~/.pip/pip.conf"), os.path.expanduser("~/.config/pip/pip.conf")]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(os.environ["PIP_CONFIG_FILE"])
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(files)
    for section in cfg.sections():
        values += cfg.get(section, "find-links", fallback="").split()
    folders = []
    for v in values:
        path = Path(v[len("file://"):] if v.startswith("file://") else v)
        if path.is_absolute() and path.is_dir() and path not in folders:
            folders.append(path)
    return folders


def _pins(constraints: Path) -> dict[str, str]:
    """name -> version for every `name==version` line (names normalised as in PEP 503)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def stage_wheels(log: Callable[[str], None] = print) -> list[Path]:
    """Hard-link (or copy) local wheels of pinned versions into docker/wheels/.

    Only wheels whose name and version (ignoring a +local label) match a pin in
    constraints.txt are staged, e.g. torch-2.13.0+cpu for torch==2.13.0.
    """
    pins = _pins(REPO / "constraints.txt")
    staged = []
    for folder in _pip_find_links():
        for wheel in sorted(folder.glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            name = re.sub(r"[-_.]+", "-", name).lower()
            if pins.get(name) != version.split("+")[0]:
                continue
            dest = WHEELS_DIR / wheel.name
            if not (dest.exists() and dest.stat().st_size == wheel.stat().st_size):
                dest.unlink(missing_ok=True)
                try:
                    os.link(wheel, dest)
                except OSError:
                    shutil.copy2(wheel, dest)
                log(f"staged {wheel} -> {dest.relative_to(REPO)}")
            staged.append(dest)
    return staged


# ---------------------------------------------------------------------------------------------
# base image


def resolve_base(client, log: Callable[[str], None] = print) -> str:
    """The image the Dockerfile's FROM should use on this machine (see module docstring)."""
    import docker

    if os.environ.get("EDGESHIP_BASE_IMAGE"):
        return os.environ["EDGESHIP_BASE_IMAGE"]
    try:
        client.images.get(DEFAULT_BASE)
        return DEFAULT_BASE
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(DEFAULT_BASE)
        log(f"pulled {DEFAULT_BASE}")
        return DEFAULT_BASE
    except docker.errors.APIError as exc:
        why = str(getattr(exc, "explanation", None) or exc).splitlines()[0][-160:]
        log(f"cannot pull {DEFAULT_BASE} ({why}); using a local Debian base")
    proc = subprocess.run([str(DOCKER_DIR / "make-base-image.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"docker/make-base-image.sh failed:\n{proc.stderr[-3000:]}")
    if proc.stderr.strip():
        log(proc.stderr.strip())
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# context hash


def _dockerignore_patterns(root: Path) -> list[str]:
    # The same parsing as docker.api.build.BuildApiMixin.build.
    path = root / ".dockerignore"
    if not path.exists():
        return []
    return [ln for ln in (x.strip() for x in path.read_text().splitlines()) if ln and ln[0] != "#"]


def context_files(root: Path = REPO, dockerfile: str = "Dockerfile") -> list[str]:
    """Relative paths of the regular files the build context holds (what the SDK tars up)."""
    from docker.utils.build import exclude_paths

    paths = exclude_paths(str(root), _dockerignore_patterns(root), dockerfile=dockerfile)
    return sorted(p for p in paths if (root / p).is_file() and not (root / p).is_symlink())


def context_hash(base_id: str, buildargs: dict[str, str], root: Path = REPO) -> str:
    """sha256 over the context files (path, exec bit, bytes), the build args and the base id."""
    h = hashlib.sha256()
    h.update(f"base={base_id}\n".encode())
    for key in sorted(buildargs):
        h.update(f"arg {key}={buildargs[key]}\n".encode())
    for rel in context_files(root):
        path = root / rel
        h.update(f"file {rel} {os.stat(path).st_mode & 0o111:o}\n".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# build


def _git_revision() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _version() -> str:
    text = (REPO / "pipeline" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    return m.group(1) if m else "unknown"


def _buildkit_cli() -> str | None:
    """A docker CLI on PATH that builds with BuildKit, or None (then the SDK's classic builder).

    BuildKit builds this image in about 40 % of the classic builder's time (no commit of a
    container per step). A CLI with the buildx plugin has it; a 20.x CLI (Debian 12's docker.io)
    has it built in. A CLI of 23+ without buildx has neither. EDGESHIP_DOCKER_BUILDER=sdk forces
    the Docker SDK, =cli requires a BuildKit CLI.
    """
    choice = os.environ.get("EDGESHIP_DOCKER_BUILDER", "auto")
    if choice == "sdk":
        return None
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(folder) / "docker"
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        if subprocess.run([exe, "buildx", "version"], capture_output=True).returncode == 0:
            return str(exe)
        proc = subprocess.run([exe, "version", "--format", "{{.Client.Version}}"],
                              capture_output=True, text=True)
        m = re.match(r"(\d+)\.", proc.stdout.strip())
        if m and int(m.group(1)) < 23:
            return str(exe)
    if choice == "cli":
        raise ImageBuildError("EDGESHIP_DOCKER_BUILDER=cli but no docker CLI on PATH builds with BuildKit")
    return None


def _build_cli(exe: str, tag: str, buildargs: dict[str, str], nocache: bool,
               emit: Callable[[str], None]) -> str | None:
    """docker build with BuildKit; returns None or the error line."""
    cmd = [exe, "build", "--progress=plain", "-t", tag, "-f", str(REPO / "Dockerfile")]
    cmd += [f"--build-arg={k}={v}" for k, v in buildargs.items()]
    cmd += ["--no-cache"] if nocache else []
    cmd.append(str(REPO))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        emit(line)
    if proc.wait() != 0:
        return f"{' '.join(cmd[:2])} exited {proc.returncode}"
    return None


def _build_sdk(client, tag: str, buildargs: dict[str, str], nocache: bool,
               emit: Callable[[str], None]) -> str | None:
    """The engine's classic builder through the Docker SDK; returns None or the error."""
    error = None
    for chunk in client.api.build(path=str(REPO), tag=tag, rm=True, forcerm=True, decode=True,
                                  pull=False, nocache=nocache, buildargs=buildargs):
        text = chunk.get("stream") or chunk.get("status") or ""
        if "error" in chunk:
            error = chunk.get("error") or str(chunk.get("errorDetail"))
            text = f"ERROR: {error}\n"
        if text:
            emit(text)
    return error


def build_image(client=None, tags: Iterable[str] = (), reuse: bool = True,
                log: Callable[[str], None] = print, stream: Callable[[str], None] | None = None,
                nocache: bool = False) -> tuple[str, dict]:
    """Build (or reuse) the image; returns (content tag, info).

    reuse=False builds even if the content tag exists; nocache=True also ignores the layer
    cache (a cold build, for timing).

    info: base, hash, reused (bool), builder, seconds, size_bytes, log (path of the build log).
    """
    if client is None:
        client, reason = engine()
        if client is None:
            raise ImageBuildError(reason)
    stage_wheels(log)
    base = resolve_base(client, log)
    base_id = client.images.get(base).id
    # VERSION/REVISION only label the image; they are not part of the content hash, so a new
    # commit that changes no file in the context reuses the image.
    buildargs = {"BASE_IMAGE": base}
    digest = context_hash(base_id, buildargs)
    tag = f"{IMAGE_REPO}:ctx-{digest[:16]}"
    info: dict = {"base": base, "hash": digest, "reused": False, "seconds": 0.0}
    log_path = REPO / "build" / "docker" / f"build-{digest[:16]}.log"

    import docker

    try:
        image = client.images.get(tag) if reuse else None
    except docker.errors.ImageNotFound:
        image = None
    if image is None:
        cli = _buildkit_cli()
        builder = "BuildKit (docker CLI)" if cli else "classic builder (Docker SDK)"
        log(f"building {tag} FROM {base} with {builder} (log: {log_path.relative_to(REPO)})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        args = {**buildargs, "VERSION": _version(), "REVISION": _git_revision()}
        t0 = time.monotonic()
        lines: list[str] = []
        with open(log_path, "w") as fh:
            def emit(text: str) -> None:
                fh.write(text)
                lines.append(text)
                del lines[:-60]
                if stream:
                    stream(text)

            if cli:
                error = _build_cli(cli, tag, args, nocache, emit)
            else:
                error = _build_sdk(client, tag, args, nocache, emit)
        info["seconds"] = round(time.monotonic() - t0, 1)
        info["builder"] = builder
        if error is not None:
            raise ImageBuildError(f"docker build failed: {error}\n--- last lines of {log_path}:\n"
                                  + "".join(lines[-40:]))
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            raise ImageBuildError(f"{builder} reported success but the engine has no {tag} "
                                  "(does the docker CLI talk to another engine than DOCKER_HOST?)")
    else:
        info["reused"] = True
        log(f"reusing {tag} (context unchanged)")
    _prune(client, keep={tag}, log=log)
    for extra in tags:
        repo, _, t = extra.rpartition(":") if ":" in extra.split("/")[-1] else (extra, "", "latest")
        image.tag(repo, t or "latest")
    info["size_bytes"] = image.attrs["Size"]
    info["log"] = str(log_path)
    return tag, info


def _prune(client, keep: set[str], newest: int = 3, log: Callable[[str], None] = print) -> None:
    """Untag all but the newest few content-tagged images, so that old dependency layers go.

    Images that a container still uses are left alone (the engine refuses, which is fine).
    """
    import docker

    images = sorted(client.images.list(name=IMAGE_REPO), key=lambda i: i.attrs["Created"], reverse=True)
    ctx_tags = [(t, img) for img in images for t in img.tags if t.startswith(f"{IMAGE_REPO}:ctx-")]
    for t, _img in ctx_tags[newest:]:
        if t in keep:
            continue
        try:
            client.images.remove(t, noprune=False)
            log(f"removed old image {t}")
        except docker.errors.APIError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", action="append", default=[], help="extra tag(s), e.g. edgeship:dev")
    ap.add_argument("--no-reuse", action="store_true", help="build even if the tag exists")
    ap.add_argument("--no-cache", action="store_true", help="ignore the layer cache (cold build)")
    ap.add_argument("--stage-wheels", action="store_true", help="only stage local wheels")
    ap.add_argument("-q", "--quiet", action="store_true", help="do not stream the build log")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"edgeship_image: {msg}", file=sys.stderr)

    if args.stage_wheels:
        stage_wheels(log)
        return 0
    try:
        tag, info = build_image(tags=args.tag, reuse=not (args.no_reuse or args.no_cache),
                                nocache=args.no_cache, log=log,
                                stream=None if args.quiet else sys.stderr.write)
    except ImageBuildError as exc:
        log(str(exc))
        return 1
    log(f"{tag}: {info['size_bytes'] / 1e6:.0f} MB, "
        + ("reused" if info["reused"] else f"built in {info['seconds']}s"))
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
