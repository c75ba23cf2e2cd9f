"""Artifacts built ON the device, before anything is timed, and cached there.

A run whose config carries a ``device_build`` block (``{"onnx_sha256", "artifact", "options"}``,
written by the host's backend) ships the model, not the runtime's artifact: a TensorRT engine is
tied to the GPU and TensorRT version that build it, an ONNX Runtime fully-optimised graph to the
CPU. The runner module brings two hooks:

    build_identity(config) -> dict     the runtime's version and the hardware the artifact is
                                       tied to; raises Unavailable("<why>, naming this host")
    build_artifact(run_dir, config, out_dir, threads) -> dict
                                       writes out_dir/<artifact>; returns {"builder", "log", ...}

The cache is ``$EDGESHIP_DEVICE_ROOT/engines/<key>/`` (the artifact, ``build.json``, ``build.log``)
with key = sha256 over (ONNX sha256, identity, precision, builder options): a redeploy of the same
model on the same device builds nothing, and the runner finds the same folder from its config.
Standard library only; never imports ``pipeline``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ENGINES = "engines"
LOG_TAIL = 40  # lines of the build log carried in results.json (the whole log stays on the device)


class Unavailable(Exception):
    """The runtime a run needs is missing on this device (one line, naming the host and the fix)."""


class BuildFailed(Exception):
    """The device-side build ran and failed (one line; the log tail says why)."""


def host_name() -> str:
    """This device's name as it calls itself (failure reasons name it: a fleet has many)."""
    return socket.gethostname() or "this device"


def python_desc() -> str:
    return f"python {sys.executable}"


def engines_dir() -> Path:
    """``$EDGESHIP_DEVICE_ROOT/engines``; the transport exports the root to every agent command."""
    root = os.environ.get("EDGESHIP_DEVICE_ROOT")
    if not root:
        raise Unavailable(f"EDGESHIP_DEVICE_ROOT is not set on {host_name()}: the engine cache lives under the "
                          "device root, which the transport exports to the agent")
    return Path(root) / ENGINES


def cache_key(config: dict[str, Any], identity: dict[str, Any]) -> str:
    """sha256 over everything the artifact depends on (the builder options included)."""
    build = config["device_build"]
    parts = {"onnx_sha256": build["onnx_sha256"], "identity": identity, "precision": config.get("precision"),
             "artifact": build["artifact"], "options": build.get("options") or {}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_path(config: dict[str, Any], identity: dict[str, Any]) -> Path:
    """Where the artifact of this run config lives on this device (built or not)."""
    return engines_dir() / cache_key(config, identity) / config["device_build"]["artifact"]


def cached_artifact(config: dict[str, Any], identity: dict[str, Any]) -> Path:
    """The runner's way in: the built artifact, or a one-line error if the prepare step did not run."""
    path = artifact_path(config, identity)
    if not path.is_file():
        raise BuildFailed(f"{path.name} for this run is not built on {host_name()} ({path.parent}); the agent's "
                          "`run` builds it before timing, or run `python -m edgeship_agent build`")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_source(run_dir: Path, config: dict[str, Any]) -> Path:
    """The shipped ONNX, checked against the digest the cache key is made of."""
    onnx = run_dir / (config.get("onnx") or config["model"])
    got = sha256_file(onnx)
    if got != config["device_build"]["onnx_sha256"]:
        raise BuildFailed(f"{onnx} on {host_name()} has sha256 {got[:12]}, the release says "
                          f"{config['device_build']['onnx_sha256'][:12]}; redeploy to repair it")
    return onnx


def prepare(run_dir: Path, config: dict[str, Any], module: ModuleType, threads: int) -> dict[str, Any]:
    """Build this run's artifact unless this device has it already; returns the results block.

    Raises Unavailable (runtime missing) or BuildFailed (the build itself failed), one line each.
    """
    identity = module.build_identity(config)
    key = cache_key(config, identity)
    final = engines_dir() / key
    artifact = final / config["device_build"]["artifact"]
    if artifact.is_file() and (final / "build.json").is_file():
        meta = json.loads((final / "build.json").read_text(encoding="utf-8"))
        return {**meta, "cached": True, "path": str(artifact)}
    _check_source(run_dir, config)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        out = module.build_artifact(run_dir, config, tmp, threads)
        seconds = round(time.perf_counter() - t0, 3)
        built = tmp / artifact.name
        if not built.is_file():
            raise BuildFailed(f"{out.get('builder', 'the builder')} wrote no {artifact.name} on {host_name()}")
        log = str(out.pop("log", "") or "")
        (tmp / "build.log").write_text(log, encoding="utf-8")
        meta = {"key": key, "identity": identity, "seconds": seconds, "built_at": round(time.time(), 3),
                "artifact": artifact.name, "artifact_sha256": sha256_file(built),
                "artifact_bytes": built.stat().st_size, "log_tail": log.splitlines()[-LOG_TAIL:], **out}
        (tmp / "build.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)  # a folder without build.json is an interrupted build
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "cached": False, "path": str(artifact)}


def cpu_identity() -> dict[str, Any]:
    """What a CPU-specific artifact is tied to: architecture, CPU model and instruction-set flags."""
    import platform

    model, flags = "", ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not model and key in ("model name", "Model", "CPU part"):
            model = value.strip()
        if not flags and key in ("flags", "Features"):
            flags = " ".join(sorted(value.split()))
    return {"arch": platform.machine(), "cpu": model or platform.processor() or "unknown",
            "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}
