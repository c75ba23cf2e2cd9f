"""The board's own sensors, read on the device: clocks, heat and power (standard library + numpy).

Everything takes ``root`` (the filesystem root: tests point it at a fixture tree laid out as the
kernel documents it) and ``run`` (runs a vendor tool and returns its stdout, or None when the tool
is missing or fails: tests hand it captured output). Reading conditions never raises; what a board
does not have is absent or None.

The formats each reader follows:

- cpufreq (Documentation/ABI/testing/sysfs-devices-system-cpu, admin-guide/pm/cpufreq.rst):
  ``cpu/online`` is a cpulist ("0-3,6"); ``cpuN/cpufreq/scaling_{governor,driver}``;
  ``scaling_{cur,min,max}_freq`` in kHz.
- thermal (Documentation/ABI/testing/sysfs-class-thermal): ``thermal_zoneN/type``, ``temp`` in
  millidegrees Celsius.
- devfreq (Documentation/ABI/testing/sysfs-class-devfreq): ``{cur,min,max}_freq`` in Hz.
- hwmon (Documentation/hwmon/sysfs-interface.rst): ``name``, ``powerN_input`` in microwatts;
  ina3221 (Documentation/hwmon/ina3221.rst): channels 1-3 are rails (``inN_label``, ``inN_input``
  bus voltage in mV, ``currN_input`` in mA, ``inN_enable``); in4-6 are shunt voltages in uV and
  in7/curr4 are sums, so they are never rails.
- powercap (Documentation/power/powercap/powercap.rst): ``intel-rapl:N/name`` ("package-N",
  "psys"; sub-zones "core", "uncore", "dram" are parts of a package), ``energy_uj`` (root-only
  since Linux 5.10, CVE-2020-8694) counting up to ``max_energy_range_uj`` and wrapping to 0.
- Raspberry Pi ``vcgencmd get_throttled``: "throttled=0x50005", bits in ``THROTTLED_BITS``;
  ``vcgencmd pmic_read_adc`` (Pi 5): one line per reading, "VDD_CORE_A current(7)=0.56259000A",
  "VDD_CORE_V volt(15)=0.76798460V" (EXT5V and BATT have a voltage only).
- Jetson: ``nvpmodel -q`` prints "NV Power Mode: MAXN" then the mode id; ``jetson_clocks
  --show`` (root) prints "cpu0: Online=1 Governor=.. MinFreq=.. MaxFreq=.. CurrentFreq=..",
  "GPU MinFreq=.. MaxFreq=.. CurrentFreq=.." (Hz), "EMC ... FreqOverride=0|1"; the EMC rate is in
  debugfs (root); tegrastats prints rails as "VDD_IN 4556mW/4556mW" (current/average; JetPack 4:
  "POM_5V_IN 3421/3421" without the unit).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path("/")
COMMAND_TIMEOUT_S = 3.0  # a vendor tool that hangs must not hold up a deploy
# Raspberry Pi firmware throttles the Arm cores from 80 C (its "Frequency management and thermal
# control" page); most other boards throttle later, so the same mark warns before they do.
HOT_C = 80.0
# Zones that report a fixed placeholder, never a temperature: NVIDIA's PMIC-Die always reads 100 C
# (Nano, TX2, Xavier). They stay in the conditions but never make a run "hot".
PLACEHOLDER_ZONES = ("PMIC-Die",)
FREQ_DROP_FRACTION = 0.10  # a clock cap or pinned clock this much lower after a window = throttled

# vcgencmd get_throttled: bit -> name. Bits 0-3 are "now", bits 16-19 "since boot".
THROTTLED_BITS = {
    0: "under_voltage",
    1: "arm_freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "arm_freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}
_THROTTLE_NOW = ("throttled", "arm_freq_capped", "soft_temp_limit")

# cpufreq drivers with their own "powersave"/"performance" policies, which both scale the clock
# dynamically (intel_pstate.rst, amd-pstate.rst): there the names mean neither pinned low nor high.
OWN_POLICY_DRIVERS = ("intel_pstate", "amd-pstate-epp")

# Jetson GPU devfreq nodes: "17000000.gpu" (JetPack 6), ".ga10b" (Orin, JetPack 5), ".gv11b"
# (Xavier), ".gp10b" (TX2), "57000000.gpu" (Nano).
GPU_DEVFREQ_MARKERS = ("gpu", "ga10b", "gv11b", "gp10b", "gm20b")
# EMC clock rate in Hz, debugfs (root): BPMP clocks (Xavier, Orin) and the older clock tree (Nano).
EMC_RATE_FILES = ("sys/kernel/debug/bpmp/debug/clk/emc/rate", "sys/kernel/debug/clk/emc/clk_rate")

Runner = Callable[[Sequence[str]], Optional[str]]


# ---------------------------------------------------------------- reading files and tools


def read_text(path: Path) -> str:
    """A sysfs file's content, stripped; raises OSError (missing, root-only, or a driver error)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _read(path: Path) -> Optional[str]:
    try:
        return read_text(path)
    except (OSError, ValueError):  # sysfs reads fail with EINVAL/ENODATA for idle or off devices
        return None


def _read_num(path: Path, scale: float = 1.0) -> Optional[float]:
    text = _read(path)
    try:
        return float(text) / scale if text is not None else None
    except ValueError:
        return None


def _numbered(paths: Iterable[Path], prefix: str) -> List[Path]:
    """``prefix<N>`` entries sorted by N (cpu10 after cpu9); anything else left out."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    matches = [(pattern.match(p.name), p) for p in paths]
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in matches if m)]


def default_run(argv: Sequence[str]) -> Optional[str]:
    """stdout of a vendor tool, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


# ---------------------------------------------------------------- clocks and heat


def _loadavg(root: Path) -> Optional[Dict[str, float]]:
    fields = (_read(root / "proc/loadavg") or "").split()
    try:
        return {"1m": float(fields[0]), "5m": float(fields[1]), "15m": float(fields[2])}
    except (IndexError, ValueError):
        return None


def _cpulist_count(text: str) -> Optional[int]:
    """Number of CPUs in a cpulist such as "0-3,6"."""
    count = 0
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    except ValueError:
        return None
    return count or None


def _cpu_count(root: Path) -> Optional[int]:
    """Online CPUs (what the load average is shared by): sysfs, else /proc/cpuinfo (chroots
    without /sys still have /proc)."""
    online = _read(root / "sys/devices/system/cpu/online")
    if online:
        return _cpulist_count(online)
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    return sum(1 for line in cpuinfo.splitlines() if re.match(r"processor\s*:", line)) or None


def _cpufreq(root: Path) -> Dict[str, Dict[str, Any]]:
    cores: Dict[str, Dict[str, Any]] = {}
    for cpu in _numbered((root / "sys/devices/system/cpu").glob("cpu*"), "cpu"):
        base = cpu / "cpufreq"
        core = {"governor": _read(base / "scaling_governor"), "driver": _read(base / "scaling_driver"),
                "mhz": _read_num(base / "scaling_cur_freq", 1e3),
                "min_mhz": _read_num(base / "scaling_min_freq", 1e3),
                "max_mhz": _read_num(base / "scaling_max_freq", 1e3)}
        core = {k: v for k, v in core.items() if v is not None}
        if core:
            cores[cpu.name] = core
    return cores


def _thermal(root: Path) -> List[Dict[str, Any]]:
    zones = []
    for zone in _numbered((root / "sys/class/thermal").glob("thermal_zone*"), "thermal_zone"):
        temp = _read_num(zone / "temp", 1e3)
        if temp is not None:
            zones.append({"zone": zone.name, "type": _read(zone / "type"), "temp_c": temp})
    return zones


def _gpu_devfreq(root: Path) -> Optional[Dict[str, Any]]:
    for node in sorted((root / "sys/class/devfreq").glob("*")):
        if any(marker in node.name.lower() for marker in GPU_DEVFREQ_MARKERS):
            gpu = {"node": node.name, "mhz": _read_num(node / "cur_freq", 1e6),
                   "min_mhz": _read_num(node / "min_freq", 1e6),
                   "max_mhz": _read_num(node / "max_freq", 1e6)}
            return {k: v for k, v in gpu.items() if v is not None}
    return None


def parse_throttled(text: str) -> Optional[Dict[str, Any]]:
    """``vcgencmd get_throttled`` ("throttled=0x50005") -> {"raw": "0x50005", <bit name>: bool}."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", text or "")
    if not m:
        return None
    value = int(m.group(1), 16)
    decoded: Dict[str, Any] = {"raw": m.group(1)}
    decoded.update({name: bool(value >> bit & 1) for bit, name in THROTTLED_BITS.items()})
    return decoded


def parse_nvpmodel(text: str) -> Optional[Dict[str, Any]]:
    """``nvpmodel -q``: "NV Power Mode: MAXN" then the mode id on its own line."""
    lines = [line.strip() for line in (text or "").splitlines()]
    for i, line in enumerate(lines):
        if "NV Power Mode:" in line:
            name = line.split("NV Power Mode:", 1)[1].strip()
            ids = [x for x in lines[i + 1:] if x.isdigit()]
            return {"name": name, "id": int(ids[0]) if ids else None}
    return None


def parse_jetson_clocks_show(text: str) -> Optional[Dict[str, Any]]:
    """``jetson_clocks --show``: active when every CPU and the GPU have MinFreq == MaxFreq and the
    EMC frequency is overridden, which is what ``jetson_clocks`` itself sets."""
    pinned: List[bool] = []
    found: Dict[str, Any] = {}
    for line in (text or "").splitlines():
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        head = line.strip().split(":")[0].split(" ")[0]
        if re.match(r"cpu\d+$", head) and "MinFreq" in fields and fields.get("Online") != "0":
            pinned.append(fields["MinFreq"] == fields.get("MaxFreq"))
        elif head == "GPU" and "MinFreq" in fields:
            pinned.append(fields["MinFreq"] == fields.get("MaxFreq"))
        elif head == "EMC" and "CurrentFreq" in fields:
            if "FreqOverride" in fields:
                pinned.append(fields["FreqOverride"] == "1")
            found["emc_mhz"] = int(fields["CurrentFreq"]) / 1e6
    if not pinned:
        return None
    return {"active": all(pinned), "source": "jetson_clocks --show", **found}


def _clocks_pinned_sysfs(cpufreq: Dict[str, Dict[str, Any]],
                         gpu: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """jetson_clocks' effect read from sysfs when ``--show`` needs root: min == max everywhere."""
    parts = list(cpufreq.values()) + ([gpu] if gpu else [])
    pairs = [(p.get("min_mhz"), p.get("max_mhz")) for p in parts]
    known = [lo == hi for lo, hi in pairs if lo is not None and hi is not None]
    return {"active": all(known), "source": "sysfs min == max"} if known else None


def _jetson(root: Path, run: Runner, cpufreq: Dict[str, Dict[str, Any]],
            gpu: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    nvpmodel = parse_nvpmodel(run(["nvpmodel", "-q"]) or "")
    # every L4T/JetPack root has /etc/nv_tegra_release (probe.py reads it too)
    if nvpmodel is None and not (root / "etc/nv_tegra_release").exists():
        return None
    shown = parse_jetson_clocks_show(run(["jetson_clocks", "--show"]) or "") or {}
    clocks = {k: shown[k] for k in ("active", "source")} if shown else _clocks_pinned_sysfs(cpufreq, gpu)
    rates = (_read_num(root / f, 1e6) for f in EMC_RATE_FILES)
    emc = next((v for v in rates if v is not None), shown.get("emc_mhz"))
    return {"nvpmodel": nvpmodel, "jetson_clocks": clocks, "emc_mhz": emc}


def read_conditions(root: Path = ROOT, run: Runner = default_run) -> Dict[str, Any]:
    """The clock and thermal state now. Keys: ``loadavg`` {"1m", "5m", "15m"} or None, ``cpus``,
    ``cpufreq`` {"cpuN": {governor, driver, mhz, min_mhz, max_mhz}}, ``thermal`` [{zone, type,
    temp_c}]; only where the board has them: ``gpu`` {node, mhz, min_mhz, max_mhz},
    ``rpi_throttled`` (``parse_throttled``), ``jetson`` {nvpmodel: {name, id}, jetson_clocks:
    {active, source}, emc_mhz}. Never raises."""
    cpufreq = _cpufreq(root)
    conditions: Dict[str, Any] = {"loadavg": _loadavg(root), "cpus": _cpu_count(root),
                                  "cpufreq": cpufreq, "thermal": _thermal(root)}
    gpu = _gpu_devfreq(root)
    if gpu:
        conditions["gpu"] = gpu
    throttled = parse_throttled(run(["vcgencmd", "get_throttled"]) or "")
    if throttled:
        conditions["rpi_throttled"] = throttled
    jetson = _jetson(root, run, cpufreq, gpu)
    if jetson:
        conditions["jetson"] = jetson
    return conditions


# ---------------------------------------------------------------- flags for a timed window


def _own_policy(core: Dict[str, Any]) -> bool:
    return core.get("driver") in OWN_POLICY_DRIVERS


def _pinned(clock: Dict[str, Any]) -> bool:
    """A clock that should not move under load: min == max (jetson_clocks, userspace pinning) or
    the generic "performance" governor."""
    lo, hi = clock.get("min_mhz"), clock.get("max_mhz")
    if lo is not None and lo == hi:
        return True
    return clock.get("governor") == "performance" and not _own_policy(clock)


def _clock_fell(before: Dict[str, Any], after: Dict[str, Any]) -> bool:
    """Throttled between two readings of one clock (a CPU core or the GPU): its cap fell (thermal
    and power limits lower the policy/devfreq max), or a clock pinned in both readings runs
    slower (hardware throttling leaves the cap alone). A dynamic governor's frequency moving
    with load says nothing, so it is not compared."""
    keep = 1.0 - FREQ_DROP_FRACTION
    b_max, a_max = before.get("max_mhz"), after.get("max_mhz")
    if b_max and a_max is not None and a_max < b_max * keep:
        return True
    b_mhz, a_mhz = before.get("mhz"), after.get("mhz")
    return bool(_pinned(before) and _pinned(after) and b_mhz and a_mhz is not None
                and a_mhz < b_mhz * keep)


def _rpi_throttled(before: Dict[str, Any], after: Dict[str, Any]) -> bool:
    """A "now" bit set at either end, or a "since boot" bit that rose during the window. The Pi's
    firmware throttles behind the kernel's back (scaling_cur_freq is the requested frequency),
    so these bits are its only evidence."""
    b, a = before.get("rpi_throttled") or {}, after.get("rpi_throttled") or {}
    if any(b.get(n) or a.get(n) for n in _THROTTLE_NOW):
        return True
    return any(a.get(n + "_occurred") and not b.get(n + "_occurred") for n in _THROTTLE_NOW)


def _throttled(before: Dict[str, Any], after: Dict[str, Any]) -> bool:
    if _rpi_throttled(before, after):
        return True
    b_cpu, a_cpu = before.get("cpufreq") or {}, after.get("cpufreq") or {}
    pairs = [(b_cpu[c], a_cpu[c]) for c in b_cpu if c in a_cpu]
    if before.get("gpu") and after.get("gpu"):
        pairs.append((before["gpu"], after["gpu"]))
    return any(_clock_fell(b, a) for b, a in pairs)


def _max_temp(*conditions: Dict[str, Any]) -> Optional[float]:
    zones = [z for c in conditions for z in c.get("thermal") or []]
    temps = [z["temp_c"] for z in zones if z.get("type") not in PLACEHOLDER_ZONES]
    return max(temps) if temps else None


def condition_flags(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    """Human flags for a timed window between two ``read_conditions``: "throttled" (see
    ``_rpi_throttled`` and ``_clock_fell``), "under-voltage" (Pi), "powersave governor" (the
    generic governor, not the dynamic policy of that name under ``OWN_POLICY_DRIVERS``), "load
    above cores" (1-minute load above the online CPUs at the start), "hot" (a zone at or over
    ``HOT_C``, ``PLACEHOLDER_ZONES`` aside)."""
    flags = []
    if _throttled(before, after):
        flags.append("throttled")
    if any((c.get("rpi_throttled") or {}).get("under_voltage") for c in (before, after)):
        flags.append("under-voltage")
    cores = [core for c in (before, after) for core in (c.get("cpufreq") or {}).values()]
    if any(core.get("governor") == "powersave" and not _own_policy(core) for core in cores):
        flags.append("powersave governor")
    load, cpus = (before.get("loadavg") or {}).get("1m"), before.get("cpus")
    if load is not None and cpus and load > cpus:
        flags.append("load above cores")
    hottest = _max_temp(before, after)
    if hottest is not None and hottest >= HOT_C:
        flags.append("hot")
    return flags
