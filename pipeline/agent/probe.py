"""What the device is: read on the device by the agent, standard library only."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

# pip name -> import name, for the runtimes the agent can drive.
RUNTIME_MODULES = {
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
    "ai-edge-litert": "ai_edge_litert",
    "tflite-runtime": "tflite_runtime",
    "ncnn": "ncnn",
    "tensorrt": "tensorrt",
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "CPU part"):
        for line in text.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_mb() -> float | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return None


def _os_release() -> str:
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def _version(module_name: str) -> str | None:
    """Version of an installed module, without importing heavy runtimes where metadata suffices."""
    try:
        from importlib import metadata

        for dist in (module_name, module_name.replace("_", "-")):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    except ImportError:  # pragma: no cover - python < 3.8
        pass
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _jetson() -> dict[str, Any] | None:
    release = _read("/etc/nv_tegra_release")
    if release is None:
        return None
    # "# R36 (release), REVISION: 4.0, ..." -> L4T 36.4.0
    l4t = None
    head = release.splitlines()[0] if release else ""
    if head.startswith("# R"):
        major = head[3:].split()[0]
        rev = head.split("REVISION:")[1].split(",")[0].strip() if "REVISION:" in head else ""
        l4t = f"{major}.{rev}" if rev else major
    return {"l4t": l4t, "tensorrt": _version("tensorrt")}


def probe() -> dict[str, Any]:
    """A JSON-able description of this device."""
    root = os.environ.get("EDGESHIP_DEVICE_ROOT", str(Path.cwd()))
    try:
        free_mb = round(shutil.disk_usage(root).free / 2**20, 1)
    except OSError:
        free_mb = None
    runtimes = {pip: _version(mod) for pip, mod in RUNTIME_MODULES.items()}
    return {
        "arch": platform.machine(),
        "os": _os_release(),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mb": _mem_total_mb(),
        "disk_free_mb": free_mb,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "runtimes": {k: v for k, v in runtimes.items() if v is not None},
        "jetson": _jetson(),
    }
