"""``python -m edgeship_agent doctor``: what a board has for TensorRT builds and real measurements.

One check per line: TensorRT (Python API or trtexec), the CUDA driver and its GPU, the GPU device
node, the power sensor, the clocks. Each says what it found or what is missing and the fix.
Standard library and numpy (the checks import tensorrt and read sysfs through sensors.py, under
``$EDGESHIP_SENSORS_ROOT`` like the measurement; they never build anything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import sensors, trt_build
from .device_build import Unavailable, host_name
from .observe import sensors_root

GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")  # dGPU, Jetson (L4T <= 35, 36)


def _check(name: str, fn: Callable[[], str]) -> dict[str, Any]:
    """Run one check: ``fn`` returns what it found, or raises Unavailable with what is missing."""
    try:
        return {"check": name, "ok": True, "detail": fn()}
    except Unavailable as exc:
        return {"check": name, "ok": False, "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a broken check is reported, the others still run
        return {"check": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}


def _tensorrt() -> str:
    version, builder = trt_build.tensorrt_version()
    if builder != "python":  # engines can be built, but the runner needs the module to run them
        raise Unavailable(f"only trtexec ({builder}, TensorRT {version}) on {host_name()}: " + trt_build.not_installed())
    return f"TensorRT {version} (python module); trtexec: {trt_build.find_trtexec() or 'not found'}"


def _cuda() -> str:
    gpu = trt_build.gpu_identity()
    return f"CUDA driver: {gpu['gpu']}, compute capability {gpu['compute_capability']}"


def _gpu_node() -> str:
    found = [p for p in GPU_NODES if Path(p).exists()]
    if not found:
        raise Unavailable(f"no NVIDIA GPU device node on {host_name()} ({', '.join(GPU_NODES)})")
    return f"device node {found[0]}"


def _power() -> str:
    found = sensors.find_power_sensor(sensors_root())
    if found is None:
        raise Unavailable(f"no power sensor on {host_name()} (INA3221 hwmon, Pi 5 PMIC, RAPL, hwmon power, "
                          "tegrastats): energy stays an estimate from tdp_w")
    if isinstance(found, dict):
        raise Unavailable(f"power sensor {found.get('sensor')} exists but cannot be read: {found.get('error')}")
    name = found.name
    found.close()
    return f"power sensor {name}"


def _clocks() -> str:
    cond = sensors.read_conditions(sensors_root())
    governors = sorted({c.get("governor") for c in (cond.get("cpufreq") or {}).values() if c.get("governor")})
    if not governors:
        raise Unavailable(f"no cpufreq in sysfs on {host_name()}: clock state cannot be read or reported")
    jetson = cond.get("jetson") or {}
    parts = [f"cpufreq governor {'/'.join(governors)} on {len(cond['cpufreq'])} cores"]
    if jetson:
        mode = (jetson.get("nvpmodel") or {}).get("name")
        pinned = (jetson.get("jetson_clocks") or {}).get("active")
        parts.append(f"nvpmodel {mode or 'unknown'}, jetson_clocks {'on' if pinned else 'off'}")
    if cond.get("gpu"):
        parts.append(f"GPU {cond['gpu'].get('mhz')} MHz")
    if "powersave" in governors:
        raise Unavailable("; ".join(parts) + ": powersave slows every timed run; set the performance governor")
    return "; ".join(parts)


CHECKS = (("tensorrt", _tensorrt), ("cuda", _cuda), ("gpu", _gpu_node), ("power", _power), ("clocks", _clocks))


def doctor() -> dict[str, Any]:
    """Every check, in order, as ``{"host", "checks": [{"check", "ok", "detail"}]}``."""
    return {"host": host_name(), "checks": [_check(name, fn) for name, fn in CHECKS]}
