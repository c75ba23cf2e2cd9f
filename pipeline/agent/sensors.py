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
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python 3.7, where the rest of the agent still runs
    Protocol = object  # type: ignore[assignment,misc]

import numpy as np

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
# Rails that carry the whole module's input (INA3221 labels and tegrastats names): when present the
# power is this rail alone, since the others are parts of it.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

Runner = Callable[[Sequence[str]], Optional[str]]
Opener = Callable[[Path], str]


class Lines(Protocol):
    """A tool that keeps printing lines (``LineStream``; tests hand in captured lines)."""

    def latest(self) -> Optional[str]: ...

    def close(self) -> None: ...


Streamer = Callable[[Sequence[str]], Optional[Lines]]


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


# ---------------------------------------------------------------- power sensors

TEGRASTATS = ("tegrastats", "--interval", "100")  # ms between lines
TEGRASTATS_FIRST_LINE_S = 3.0


class SensorReadError(OSError):
    """A sensor that exists could not be read; ``result`` is results.json's ``power`` for it."""

    def __init__(self, result: Dict[str, str]):
        super().__init__(result["error"])
        self.result = result


class PowerSensor:
    """One source of board power. Instant sensors implement ``read_w`` (watts now); energy
    counters (RAPL) set ``energy_counter`` and implement ``read_counters`` and ``delta_j``.
    ``close`` releases what a sensor holds (tegrastats' process)."""

    name = "unknown"
    energy_counter = False
    min_interval_s = 0.0  # a sensor that spawns a tool per reading is not sampled faster
    permission_hint = ""

    def read_w(self) -> float:
        raise NotImplementedError

    def read_counters(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def delta_j(self, before: Tuple[int, ...], after: Tuple[int, ...]) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "PowerSensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sensor_error(sensor: PowerSensor, exc: BaseException) -> Dict[str, str]:
    """results.json's ``power`` for a sensor that exists but cannot be read."""
    hint = sensor.permission_hint if isinstance(exc, PermissionError) else ""
    return {"sensor": sensor.name, "error": f"{exc}{hint}"}


def _choose_rails(labels: List[str]) -> List[str]:
    """The module's input rail when the board has one (the others are parts of it), else all."""
    inputs = [label for label in labels if label in INPUT_RAILS]
    return inputs[:1] or labels


class RailsSensor(PowerSensor):
    """INA3221 rails in hwmon: watts = sum of bus mV x mA over the chosen channels."""

    def __init__(self, rails: List[Tuple[str, Path, Path]], opener: Opener):
        self.name = "ina3221:" + "+".join(label for label, _, _ in rails)
        self._rails, self._open = rails, opener

    def read_w(self) -> float:
        return sum(float(self._open(mv)) * float(self._open(ma)) for _, mv, ma in self._rails) / 1e6


def _hwmon_dirs(root: Path) -> List[Path]:
    return _numbered((root / "sys/class/hwmon").glob("hwmon*"), "hwmon")


def _ina3221_sensor(root: Path, opener: Opener) -> Optional[PowerSensor]:
    rails: List[Tuple[str, Path, Path]] = []
    for hw in (d for d in _hwmon_dirs(root) if _read(d / "name") == "ina3221"):
        for ch in (1, 2, 3):  # in4-7 and curr4 are shunt voltages and sums, not rails
            label = _read(hw / f"in{ch}_label")
            mv, ma = hw / f"in{ch}_input", hw / f"curr{ch}_input"
            if label and label != "NC" and _read(hw / f"in{ch}_enable") != "0" and mv.exists() and ma.exists():
                rails.append((label, mv, ma))
    chosen = _choose_rails([label for label, _, _ in rails])
    return RailsSensor([r for r in rails if r[0] in chosen], opener) if rails else None


def parse_pmic_read_adc(text: str) -> Dict[str, float]:
    """``vcgencmd pmic_read_adc`` -> watts per rail, for rails with both a _V and an _A reading."""
    amps: Dict[str, float] = {}
    volts: Dict[str, float] = {}
    pattern = r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$"
    for m in re.finditer(pattern, text or "", re.MULTILINE):
        (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


class PmicSensor(PowerSensor):
    """Raspberry Pi 5 PMIC: the sum of its rails' V x A. Leaves out the PMIC's conversion losses
    and what USB and the 5 V pins draw, so it reads below the wall."""

    name = "rpi5-pmic"
    min_interval_s = 0.25  # each reading is a vcgencmd process (~0.1 s on a Pi 5)

    def __init__(self, run: Runner):
        self._run = run

    def read_w(self) -> float:
        rails = parse_pmic_read_adc(self._run(["vcgencmd", "pmic_read_adc"]) or "")
        if not rails:
            raise OSError("vcgencmd pmic_read_adc gave no rail with both a voltage and a current")
        return sum(rails.values())


def _pmic_sensor(run: Runner) -> Optional[PowerSensor]:
    return PmicSensor(run) if parse_pmic_read_adc(run(["vcgencmd", "pmic_read_adc"]) or "") else None


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after ``max_range`` (powercap's energy_uj), assuming
    at most one wrap between two reads: the sampler reads far more often than the range lasts."""
    return after - before if after >= before else after + max_range - before


class RaplSensor(PowerSensor):
    """RAPL package domains (powercap): energy counters in uJ, summed over the packages."""

    energy_counter = True
    permission_hint = " (RAPL energy_uj is readable by root only since Linux 5.10)"

    def __init__(self, zones: List[Tuple[str, Path, int]], opener: Opener):
        self.name = "rapl:" + "+".join(name for name, _, _ in zones)
        self._zones, self._open = zones, opener

    def read_counters(self) -> Tuple[int, ...]:
        return tuple(int(self._open(path)) for _, path, _ in self._zones)

    def delta_j(self, before: Tuple[int, ...], after: Tuple[int, ...]) -> float:
        spans = zip(before, after, (rng for _, _, rng in self._zones))
        return sum(counter_delta(b, a, rng) for b, a, rng in spans) / 1e6


def _rapl_sensor(root: Path, opener: Opener) -> Optional[PowerSensor]:
    zones = []
    # top-level zones only ("intel-rapl:N"); "intel-rapl:N:M" are parts of package N
    for zone in _numbered((root / "sys/class/powercap").glob("intel-rapl:*"), "intel-rapl:"):
        name, rng = _read(zone / "name") or "", _read_num(zone / "max_energy_range_uj")
        if name.startswith("package") and rng and (zone / "energy_uj").exists():
            zones.append((name, zone / "energy_uj", int(rng)))
    return RaplSensor(zones, opener) if zones else None


class HwmonPowerSensor(PowerSensor):
    """A generic hwmon device's power*_input channels (uW), summed."""

    def __init__(self, name: str, files: List[Path], opener: Opener):
        self.name = f"hwmon:{name}"
        self._files, self._open = files, opener

    def read_w(self) -> float:
        return sum(float(self._open(f)) for f in self._files) / 1e6


def _hwmon_sensor(root: Path, opener: Opener) -> Optional[PowerSensor]:
    for hw in _hwmon_dirs(root):
        name = _read(hw / "name") or hw.name
        files = sorted(hw.glob("power*_input"))
        if files and name != "ina3221":
            return HwmonPowerSensor(name, files, opener)
    return None


def parse_tegrastats_rails(line: str) -> Dict[str, float]:
    """Rails of one tegrastats line -> their current reading in mW ("VDD_IN 4556mW/4556mW" is
    current/average; JetPack 4 prints "POM_5V_IN 3421/3421")."""
    pattern = r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)"
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, line or "")}


class LineStream:
    """The newest line of a tool that keeps printing (tegrastats), kept by a daemon thread."""

    def __init__(self, proc: "subprocess.Popen[str]"):
        self._proc = proc
        self._line: Optional[str] = None
        self._first = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._line = line.strip()
            self._first.set()
        self._first.set()  # the tool ended: nobody should wait for a first line

    def latest(self, timeout_s: float = TEGRASTATS_FIRST_LINE_S) -> Optional[str]:
        """The newest line, waiting up to ``timeout_s`` for the first; None once the tool ended
        (a stale line would pass for a reading)."""
        self._first.wait(timeout_s)
        return self._line if self._proc.poll() is None else None

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def default_stream(argv: Sequence[str]) -> Optional[LineStream]:
    """Start a tool that keeps printing lines; None when it is not installed."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    return LineStream(proc)


class TegrastatsSensor(PowerSensor):
    """Jetson rails as tegrastats prints them (fallback when hwmon has no INA3221 rails)."""

    min_interval_s = 0.1  # tegrastats prints a line every 100 ms (TEGRASTATS)

    def __init__(self, stream: Lines, rails: List[str]):
        self.name = "tegrastats:" + "+".join(rails)
        self._stream, self._rails = stream, rails

    def read_w(self) -> float:
        found = parse_tegrastats_rails(self._stream.latest() or "")
        if any(rail not in found for rail in self._rails):
            raise OSError(f"tegrastats printed no line with {'+'.join(self._rails)}")
        return sum(found[rail] for rail in self._rails) / 1e3

    def close(self) -> None:
        self._stream.close()


def _tegrastats_sensor(stream: Streamer) -> Optional[PowerSensor]:
    lines = stream(TEGRASTATS)
    if lines is None:
        return None
    rails = list(parse_tegrastats_rails(lines.latest() or ""))
    if not rails:
        lines.close()
        return None
    return TegrastatsSensor(lines, _choose_rails(rails))


def _candidates(root: Path, run: Runner, stream: Streamer, opener: Opener) -> Iterable[Optional[PowerSensor]]:
    """In order of preference; lazily, so tegrastats only starts when nothing before it exists."""
    yield _ina3221_sensor(root, opener)
    yield _pmic_sensor(run)
    yield _rapl_sensor(root, opener)
    yield _hwmon_sensor(root, opener)
    yield _tegrastats_sensor(stream)


def _probe(sensor: PowerSensor) -> None:
    if sensor.energy_counter:
        sensor.read_counters()
    else:
        sensor.read_w()


def find_power_sensor(root: Path = ROOT, run: Runner = default_run,
                      stream: Streamer = default_stream,
                      opener: Opener = read_text) -> Union[PowerSensor, Dict[str, str], None]:
    """The board's power sensor: Jetson INA3221 rails, Raspberry Pi 5 PMIC, RAPL packages, a
    generic hwmon power*_input device, tegrastats; the first one that reads wins. Returns the
    ``PowerSensor`` (close it when done), else the first sensor that exists but cannot be read
    as results.json's ``{"sensor", "error"}``, else None (no sensor: the caller labels its
    estimate). ``stream`` starts tegrastats, ``opener`` reads a sysfs file (both for tests)."""
    first_error: Optional[Dict[str, str]] = None
    for sensor in _candidates(root, run, stream, opener):
        if sensor is None:
            continue
        try:
            _probe(sensor)
            return sensor
        except (OSError, ValueError) as exc:
            sensor.close()
            first_error = first_error or sensor_error(sensor, exc)
    return first_error


# ---------------------------------------------------------------- sampling and the summary


def _mean_w(samples_w: Sequence[float], window_s: float, energy_j: Optional[float]) -> Optional[float]:
    """An energy counter's mean is exact (energy over the window); instant samples, taken at an
    even interval, are averaged."""
    if energy_j is not None:
        return energy_j / window_s if window_s > 0 else None
    return float(np.mean(samples_w)) if len(samples_w) else None


class PowerSampler:
    """Samples ``sensor`` in a background thread while the timed runs go::

        with PowerSampler(sensor) as sampler:
            ...timed runs...
        power = sampler.summary(idle_w, inferences)

    ``samples`` holds (time.monotonic(), watts); for an energy counter each is the mean over the
    interval ending then, and ``energy_j`` the exact energy over the window. A read failure
    stops sampling and ``summary`` gives ``{"sensor", "error"}``."""

    def __init__(self, sensor: PowerSensor, interval_s: float = 0.05):
        self.sensor = sensor
        self.interval_s = max(interval_s, sensor.min_interval_s)
        self.samples: List[Tuple[float, float]] = []
        self.energy_j: Optional[float] = 0.0 if sensor.energy_counter else None
        self.error: Optional[str] = None
        self.window_s = 0.0
        self._counters: Optional[Tuple[int, ...]] = None
        self._t_first: Optional[float] = None
        self._t_last = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PowerSampler":
        self._tick()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._tick()
        self.window_s = self._t_last - (self._t_first or self._t_last)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def _tick(self) -> None:
        if self.error is not None:
            return
        now = time.monotonic()
        try:
            if self.sensor.energy_counter:
                self._count(now, self.sensor.read_counters())
            else:
                self.samples.append((now, self.sensor.read_w()))
        except (OSError, ValueError) as exc:
            self.error = sensor_error(self.sensor, exc)["error"]
            self._stop.set()
            return
        self._t_first = now if self._t_first is None else self._t_first
        self._t_last = now

    def _count(self, now: float, counters: Tuple[int, ...]) -> None:
        if self._counters is not None and self.energy_j is not None:
            joules = self.sensor.delta_j(self._counters, counters)
            self.energy_j += joules
            if now > self._t_last:
                self.samples.append((now, joules / (now - self._t_last)))
        self._counters = counters

    def watts_between(self, t0: float, t1: float) -> List[float]:
        """Samples taken in [t0, t1] (time.monotonic()): one round's share of the window."""
        return [w for t, w in list(self.samples) if t0 <= t <= t1]

    def mean_w(self) -> Optional[float]:
        return _mean_w([w for _, w in self.samples], self.window_s, self.energy_j)

    def summary(self, idle_w: Optional[float], inferences: int) -> Dict[str, Any]:
        if self.error is not None:
            return {"sensor": self.sensor.name, "error": self.error}
        return power_summary(self.sensor.name, [w for _, w in self.samples], self.window_s,
                             idle_w, inferences, energy_j=self.energy_j)


def idle_baseline(sensor: PowerSensor, seconds: float = 1.0, interval_s: float = 0.05) -> float:
    """Mean watts over ``seconds`` of doing nothing, taken just before the timed runs; raises
    ``SensorReadError`` (its ``result`` is ``{"sensor", "error"}``) when the sensor fails."""
    with PowerSampler(sensor, interval_s) as sampler:
        time.sleep(seconds)
    mean = sampler.mean_w()
    if sampler.error is not None or mean is None:
        raise SensorReadError({"sensor": sensor.name, "error": sampler.error or "no reading"})
    return mean


def power_summary(sensor: str, samples_w: Sequence[float], window_s: float, idle_w: Optional[float],
                  inferences: int, energy_j: Optional[float] = None) -> Dict[str, Any]:
    """results.json's ``power``: {sensor, mean_w, p90_w, idle_w, energy_mj_per_inference,
    window_s}. Energy is the window's (``energy_j`` from a counter, else mean x window) net of
    the idle baseline, never negative; without a baseline (``idle_w`` None) it is the gross."""
    mean_w = _mean_w(samples_w, window_s, energy_j)
    if mean_w is None:
        return {"sensor": sensor, "error": "no power reading in the window"}
    total_j = energy_j if energy_j is not None else mean_w * window_s
    net_j = max(0.0, total_j - (idle_w or 0.0) * window_s)
    p90_w = float(np.percentile(samples_w, 90)) if len(samples_w) else mean_w
    return {"sensor": sensor, "mean_w": round(mean_w, 3), "p90_w": round(p90_w, 3),
            "idle_w": None if idle_w is None else round(idle_w, 3),
            "energy_mj_per_inference": round(net_j * 1e3 / inferences, 6) if inferences > 0 else None,
            "window_s": round(window_s, 3)}
