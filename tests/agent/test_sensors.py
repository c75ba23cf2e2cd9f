"""pipeline.agent.sensors against fixture trees laid out as the kernel and the vendors document
them (sysfs classes as symlinks into /sys/devices, units as the ABI files state) and captured tool
output handed in through a fake ``run``. Known answers are worked out by hand in each test."""

from __future__ import annotations

import ast
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from pipeline.agent import sensors
from pipeline.agent.sensors import (
    HOT_C,
    PowerSampler,
    PowerSensor,
    SensorReadError,
    condition_flags,
    counter_delta,
    find_power_sensor,
    idle_baseline,
    parse_pmic_read_adc,
    parse_throttled,
    power_summary,
    read_conditions,
)

SUMMARY_KEYS = {"sensor", "mean_w", "p90_w", "idle_w", "energy_mj_per_inference", "window_s"}


# ---------------------------------------------------------------- fixture builders


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def device(root: Path, class_rel: str, device_rel: str, files: Dict[str, str]) -> Path:
    """A device directory under sys/devices and its sys/class entry as a relative symlink, the
    way sysfs lays classes out."""
    dev = root / device_rel
    dev.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write(dev, name, text)
    link = root / class_rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(dev, link.parent))
    return dev


def fake_run(outputs: Dict[str, str]) -> Callable[[Sequence[str]], Optional[str]]:
    """A tool runner answering with captured stdout; None (missing tool) for anything else."""
    calls: List[str] = []

    def run(argv: Sequence[str]) -> Optional[str]:
        calls.append(" ".join(argv))
        return outputs.get(" ".join(argv))

    run.calls = calls  # type: ignore[attr-defined]
    return run


NO_TOOLS = fake_run({})


class FakeLines:
    """Captured tegrastats output standing in for the running tool."""

    def __init__(self, line: Optional[str]):
        self.line, self.closed = line, False

    def latest(self) -> Optional[str]:
        return self.line

    def close(self) -> None:
        self.closed = True


def no_stream(argv: Sequence[str]) -> None:
    return None


def cpus(root: Path, n: int, governor: str, driver: str, cur_khz: int, min_khz: int, max_khz: int) -> None:
    write(root, "sys/devices/system/cpu/online", f"0-{n - 1}")
    for i in range(n):
        base = f"sys/devices/system/cpu/cpu{i}/cpufreq"
        for name, value in (("scaling_governor", governor), ("scaling_driver", driver),
                            ("scaling_cur_freq", cur_khz), ("scaling_min_freq", min_khz),
                            ("scaling_max_freq", max_khz)):
            write(root, f"{base}/{name}", str(value))


def thermal(root: Path, zones: Dict[int, tuple]) -> None:
    for n, (kind, millideg) in zones.items():
        device(root, f"sys/class/thermal/thermal_zone{n}", f"sys/devices/virtual/thermal/thermal_zone{n}",
               {"type": kind, "temp": str(millideg)})


def ina3221(root: Path, hwmon: int, addr: str, channels: Dict[int, tuple]) -> None:
    """An INA3221 as JetPack 5/6 exposes it: channels 1-3 (label, bus mV, mA), plus the shunt
    voltages (in4-6, uV) and the sums (in7, curr4) that are not rails."""
    files = {"name": "ina3221"}
    for ch, (label, mv, ma) in channels.items():
        files.update({f"in{ch}_label": label, f"in{ch}_input": str(mv), f"curr{ch}_input": str(ma),
                      f"in{ch}_enable": "1", f"shunt{ch}_resistor": "5000"})
        files[f"in{ch + 3}_input"] = str(ma * 5)  # shunt uV = mA x 5 mOhm
    files.update({"in7_label": "sum of shunt voltages", "in7_input": "9999", "curr4_input": "9999"})
    device(root, f"sys/class/hwmon/hwmon{hwmon}",
           f"sys/devices/platform/bus@0/c240000.i2c/i2c-1/{addr}/hwmon/hwmon{hwmon}", files)


def jetson_orin_nano(root: Path) -> Path:
    write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, "
                                        "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025")
    write(root, "proc/loadavg", "0.52 0.40 0.31 1/412 3021")
    cpus(root, 6, "schedutil", "tegra194", 1344000, 729600, 1344000)
    thermal(root, {0: ("cpu-thermal", 47687), 1: ("gpu-thermal", 48625), 2: ("cv0-thermal", -256000),
                   8: ("tj-thermal", 48625)})
    device(root, "sys/class/devfreq/17000000.gpu", "sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu",
           {"cur_freq": "306000000", "min_freq": "306000000", "max_freq": "625000000"})
    device(root, "sys/class/hwmon/hwmon0", "sys/devices/platform/pwm-fan/hwmon/hwmon0",
           {"name": "pwmfan", "pwm1": "58"})
    ina3221(root, 1, "1-0040", {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 100),
                                3: ("VDD_SOC", 5000, 300)})
    write(root, "sys/kernel/debug/bpmp/debug/clk/emc/rate", "3199000000")
    return root


JETSON_CLOCKS_SHOW = """\
SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Engineering Reference Developer Kit
Online CPUs: 0-5
cpu0:  Online=1 Governor=schedutil MinFreq={cmin} MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu1:  Online=1 Governor=schedutil MinFreq={cmin} MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu2:  Online=1 Governor=schedutil MinFreq={cmin} MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu3:  Online=1 Governor=schedutil MinFreq={cmin} MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu4:  Online=0 Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=729600 IdleStates: WFI=1 c7=1
cpu5:  Online=1 Governor=schedutil MinFreq={cmin} MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
GPU MinFreq={gmin} MaxFreq=625000000 CurrentFreq=625000000
Active GPU TPCs: 4
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride={emc}
FAN Dynamic Speed Control=nvfancontrol hwmon0_pwm1=58
NV Power Mode: 15W
"""
LOCKED = JETSON_CLOCKS_SHOW.format(cmin=1344000, gmin=625000000, emc=1)
UNLOCKED = JETSON_CLOCKS_SHOW.format(cmin=729600, gmin=306000000, emc=0)
NVPMODEL_Q = "NV Power Mode: 15W\n0\n"

ORIN_NANO_TEGRASTATS = (
    "07-14-2025 10:29:36 RAM 2147/7620MB (lfb 2x4MB) SWAP 1476/3810MB (cached 1MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@47.687C soc2@46.718C "
    "soc0@47.468C gpu@48.625C tj@48.625C soc1@48.25C VDD_IN 4556mW/4500mW "
    "VDD_CPU_GPU_CV 483mW/480mW VDD_SOC 1451mW/1450mW")
NANO_JETPACK4_TEGRASTATS = (
    "RAM 2052/3956MB (lfb 73x4MB) SWAP 0/1978MB (cached 0MB) CPU [5%@1479,3%@1479,2%@1479,1%@1479] "
    "EMC_FREQ 0% GR3D_FREQ 0% PLL@32C CPU@34.5C PMIC@100C GPU@33C AO@39.5C thermal@33.75C "
    "POM_5V_IN 2398/2398 POM_5V_GPU 0/0 POM_5V_CPU 382/382")
AGX_ORIN_TEGRASTATS = (
    "04-24-2023 00:01:24 RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 cpu@45.5C tj@45.5C "
    "VDD_GPU_SOC 3188mW/3188mW VDD_CPU_CV 797mW/797mW VIN_SYS_5V0 4211mW/4211mW VDDQ_VDD2_1V8AO 504mW/504mW")

# `vcgencmd pmic_read_adc` on a Pi 5, laid out as the firmware prints it (leading spaces,
# non-sequential channel numbers, EXT5V and BATT with a voltage only); round values to sum by hand.
PMIC_READ_ADC = """\
 3V7_WL_SW_A current(0)=0.10000000A
   3V3_SYS_A current(1)=0.20000000A
   1V8_SYS_A current(2)=0.50000000A
  DDR_VDD2_A current(3)=0.10000000A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.20000000A
    0V8_SW_A current(6)=0.50000000A
  VDD_CORE_A current(7)=2.00000000A
   3V3_DAC_A current(17)=0.00000000A
   3V3_ADC_A current(18)=0.00000000A
   0V8_AON_A current(16)=0.00000000A
      HDMI_A current(22)=0.02000000A
 3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.30000000V
   1V8_SYS_V volt(10)=1.80000000V
  DDR_VDD2_V volt(11)=1.10000000V
  DDR_VDDQ_V volt(12)=0.60000000V
   1V1_SYS_V volt(13)=1.10000000V
    0V8_SW_V volt(14)=0.80000000V
  VDD_CORE_V volt(15)=0.80000000V
   3V3_DAC_V volt(20)=3.30000000V
   3V3_ADC_V volt(21)=3.30000000V
   0V8_AON_V volt(19)=0.80000000V
      HDMI_V volt(23)=5.00000000V
     EXT5V_V volt(24)=5.10000000V
      BATT_V volt(25)=3.00000000V
"""
# 0.1x3.7 + 0.2x3.3 + 0.5x1.8 + 0.1x1.1 + 0 + 0.2x1.1 + 0.5x0.8 + 2.0x0.8 + 0 + 0 + 0 + 0.02x5.0
PMIC_WATTS = 0.37 + 0.66 + 0.9 + 0.11 + 0.22 + 0.4 + 1.6 + 0.1


def raspberry_pi5(root: Path, temp_millideg: int = 52100) -> Path:
    write(root, "proc/loadavg", "4.50 2.10 1.00 5/230 1200")
    cpus(root, 4, "ondemand", "cpufreq-dt", 2400000, 1500000, 2400000)
    thermal(root, {0: ("cpu-thermal", temp_millideg)})
    device(root, "sys/class/hwmon/hwmon0", "sys/devices/virtual/thermal/thermal_zone0/hwmon0",
           {"name": "cpu_thermal", "temp1_input": str(temp_millideg)})
    return root


PI5_TOOLS = {"vcgencmd get_throttled": "throttled=0x50005\n", "vcgencmd pmic_read_adc": PMIC_READ_ADC}

RAPL_MAX = 262143328850  # max_energy_range_uj of a desktop package domain


def rapl(root: Path, packages: int = 1, energy: int = 1000) -> Path:
    """powercap as intel_rapl lays it out: the control type, package zones with core/uncore/dram
    sub-zones, a psys zone, and the MMIO interface's duplicate package zone."""
    base = "sys/devices/virtual/powercap/intel-rapl"
    device(root, "sys/class/powercap/intel-rapl", base, {"enabled": "1"})
    for n in range(packages):
        zone = f"{base}/intel-rapl:{n}"
        device(root, f"sys/class/powercap/intel-rapl:{n}", zone,
               {"name": f"package-{n}", "energy_uj": str(energy), "max_energy_range_uj": str(RAPL_MAX),
                "enabled": "1"})
        for m, part in enumerate(("core", "uncore", "dram")):
            device(root, f"sys/class/powercap/intel-rapl:{n}:{m}", f"{zone}/intel-rapl:{n}:{m}",
                   {"name": part, "energy_uj": "5", "max_energy_range_uj": str(RAPL_MAX)})
    device(root, f"sys/class/powercap/intel-rapl:{packages}", f"{base}/intel-rapl:{packages}",
           {"name": "psys", "energy_uj": "7", "max_energy_range_uj": str(RAPL_MAX)})
    device(root, "sys/class/powercap/intel-rapl-mmio:0",
           "sys/devices/virtual/powercap/intel-rapl-mmio/intel-rapl-mmio:0",
           {"name": "package-0", "energy_uj": "9", "max_energy_range_uj": str(RAPL_MAX)})
    return root


def denied(path: Path) -> str:
    """An opener for a non-root agent: energy_uj is mode 0400 since Linux 5.10."""
    if path.name == "energy_uj":
        raise PermissionError(13, "Permission denied", str(path))
    return sensors.read_text(path)


# ---------------------------------------------------------------- conditions


def test_jetson_conditions_without_root(tmp_path):
    c = read_conditions(jetson_orin_nano(tmp_path), fake_run({"nvpmodel -q": NVPMODEL_Q}))
    assert c["loadavg"] == {"1m": 0.52, "5m": 0.40, "15m": 0.31}
    assert c["cpus"] == 6
    assert c["cpufreq"]["cpu5"] == {"governor": "schedutil", "driver": "tegra194", "mhz": 1344.0,
                                    "min_mhz": 729.6, "max_mhz": 1344.0}
    assert [z["type"] for z in c["thermal"]] == ["cpu-thermal", "gpu-thermal", "cv0-thermal", "tj-thermal"]
    assert c["thermal"][-1] == {"zone": "thermal_zone8", "type": "tj-thermal", "temp_c": 48.625}
    assert c["thermal"][2]["temp_c"] == -256.0  # an off CV cluster reads as tegrastats shows it
    assert c["gpu"] == {"node": "17000000.gpu", "mhz": 306.0, "min_mhz": 306.0, "max_mhz": 625.0}
    # --show needs root: the clocks' state comes from sysfs (min < max: not pinned)
    assert c["jetson"] == {"nvpmodel": {"name": "15W", "id": 0},
                           "jetson_clocks": {"active": False, "source": "sysfs min == max"},
                           "emc_mhz": 3199.0}
    assert "rpi_throttled" not in c


@pytest.mark.parametrize("shown, active", [(LOCKED, True), (UNLOCKED, False)])
def test_jetson_clocks_show(tmp_path, shown, active):
    root = jetson_orin_nano(tmp_path)
    (root / "sys/kernel/debug/bpmp/debug/clk/emc/rate").unlink()  # debugfs not mounted: from --show
    c = read_conditions(root, fake_run({"nvpmodel -q": NVPMODEL_Q, "jetson_clocks --show": shown}))
    assert c["jetson"]["jetson_clocks"] == {"active": active, "source": "jetson_clocks --show"}
    assert c["jetson"]["emc_mhz"] == 3199.0


def test_raspberry_pi5_conditions_decode_get_throttled(tmp_path):
    c = read_conditions(raspberry_pi5(tmp_path), fake_run(PI5_TOOLS))
    # 0x50005 = bits 0, 2, 16, 18
    assert c["rpi_throttled"] == {
        "raw": "0x50005", "under_voltage": True, "arm_freq_capped": False, "throttled": True,
        "soft_temp_limit": False, "under_voltage_occurred": True, "arm_freq_capped_occurred": False,
        "throttled_occurred": True, "soft_temp_limit_occurred": False}
    assert c["cpus"] == 4 and c["cpufreq"]["cpu3"]["mhz"] == 2400.0
    assert "jetson" not in c and "gpu" not in c


def test_get_throttled_every_bit_and_garbage():
    assert all(v for k, v in parse_throttled("throttled=0xf000f").items() if k != "raw")
    assert not any(v for k, v in parse_throttled("throttled=0x0").items() if k != "raw")
    assert parse_throttled('error=1 error_msg="Command not registered"') is None


def test_nothing_there_is_empty_not_an_error(tmp_path):
    assert read_conditions(tmp_path, NO_TOOLS) == {"loadavg": None, "cpus": None, "cpufreq": {}, "thermal": []}
    assert find_power_sensor(tmp_path, NO_TOOLS, no_stream) is None


def test_chroot_without_sys(tmp_path):
    """The emulated devices: a chroot with /proc mounted and no /sys."""
    write(tmp_path, "proc/loadavg", "1.00 0.50 0.25 2/100 42")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n")
    c = read_conditions(tmp_path, NO_TOOLS)
    assert c == {"loadavg": {"1m": 1.0, "5m": 0.5, "15m": 0.25}, "cpus": 2, "cpufreq": {}, "thermal": []}
    assert find_power_sensor(tmp_path, NO_TOOLS, no_stream) is None
    assert condition_flags(c, c) == []


def test_unreadable_and_malformed_files_are_left_out(tmp_path):
    cpus(tmp_path, 2, "schedutil", "cpufreq-dt", 1000000, 500000, 1000000)
    write(tmp_path, "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", "<unknown>")
    thermal(tmp_path, {0: ("cpu-thermal", 40000), 1: ("battery", "")})
    write(tmp_path, "proc/loadavg", "garbage")
    c = read_conditions(tmp_path, NO_TOOLS)
    assert "mhz" not in c["cpufreq"]["cpu1"] and c["cpufreq"]["cpu0"]["mhz"] == 1000.0
    assert c["thermal"] == [{"zone": "thermal_zone0", "type": "cpu-thermal", "temp_c": 40.0}]
    assert c["loadavg"] is None


def test_this_machine():
    """Whatever this host is (an x86 VM here), conditions read and the power answer is honest."""
    c = read_conditions()
    assert c["loadavg"] is not None and c["cpus"] >= 1
    found = find_power_sensor()
    if isinstance(found, PowerSensor):
        with found:
            assert found.name.split(":")[0] in ("ina3221", "rpi5-pmic", "rapl", "hwmon", "tegrastats")
    else:
        assert found is None or set(found) == {"sensor", "error"}


# ---------------------------------------------------------------- flags


def conditions(governor="schedutil", driver="cpufreq-dt", mhz=2000.0, min_mhz=500.0, max_mhz=2000.0,
               load=0.5, n=4, temp=50.0, throttled=None, gpu=None) -> dict:
    core = {"governor": governor, "driver": driver, "mhz": mhz, "min_mhz": min_mhz, "max_mhz": max_mhz}
    c = {"loadavg": {"1m": load, "5m": load, "15m": load}, "cpus": n,
         "cpufreq": {f"cpu{i}": dict(core) for i in range(n)},
         "thermal": [{"zone": "thermal_zone0", "type": "cpu-thermal", "temp_c": temp}]}
    if throttled is not None:
        c["rpi_throttled"] = parse_throttled(f"throttled={throttled}")
    if gpu is not None:
        c["gpu"] = gpu
    return c


def test_calm_window_has_no_flags():
    assert condition_flags(conditions(), conditions(mhz=1200.0)) == []  # schedutil moving with load
    assert condition_flags({}, {}) == []


def test_pi5_fixture_flags(tmp_path):
    before = read_conditions(raspberry_pi5(tmp_path, temp_millideg=81250), fake_run(PI5_TOOLS))
    assert condition_flags(before, before) == ["throttled", "under-voltage", "load above cores", "hot"]


@pytest.mark.parametrize("before, after, flagged", [
    ("0x0", "0x0", False),
    ("0x0", "0x40000", True),  # throttling occurred during the window
    ("0x40000", "0x40000", False),  # it occurred before the window (the bit is sticky since boot)
    ("0x0", "0x2", True),  # arm frequency capped now
    ("0x8", "0x0", True),  # soft temperature limit active at the start
    ("0x10000", "0x10000", False),  # an old under-voltage alone does not throttle
])
def test_rpi_throttled_bits(before, after, flagged):
    flags = condition_flags(conditions(throttled=before), conditions(throttled=after))
    assert ("throttled" in flags) is flagged


def test_frequency_rules():
    # the cap fell (thermal cooling lowers the policy max): throttled whatever the governor
    assert "throttled" in condition_flags(conditions(max_mhz=2400.0), conditions(max_mhz=1500.0, mhz=1500.0))
    # a pinned clock runs slower: throttled (hardware throttling leaves the cap alone)
    pinned = dict(min_mhz=2000.0, max_mhz=2000.0)
    assert "throttled" in condition_flags(conditions(**pinned), conditions(mhz=1500.0, **pinned))
    assert "throttled" in condition_flags(conditions(governor="performance"),
                                          conditions(governor="performance", mhz=1500.0))
    # a drop inside FREQ_DROP_FRACTION is noise
    assert condition_flags(conditions(**pinned), conditions(mhz=1900.0, **pinned)) == []
    # intel_pstate's "performance" scales dynamically: its moving clock says nothing
    assert condition_flags(conditions(governor="performance", driver="intel_pstate"),
                           conditions(governor="performance", driver="intel_pstate", mhz=1200.0)) == []


def test_gpu_pinned_by_jetson_clocks_slows_down():
    gpu = {"node": "17000000.gpu", "mhz": 625.0, "min_mhz": 625.0, "max_mhz": 625.0}
    slow = dict(gpu, mhz=306.0)
    assert condition_flags(conditions(gpu=gpu), conditions(gpu=slow)) == ["throttled"]
    dynamic = dict(gpu, min_mhz=306.0)
    assert condition_flags(conditions(gpu=dynamic), conditions(gpu=dict(dynamic, mhz=306.0))) == []


def test_powersave_load_and_heat():
    assert condition_flags(conditions(governor="powersave"), conditions()) == ["powersave governor"]
    # intel_pstate's default "powersave" is its dynamic policy, not the pinned-low governor
    ps = dict(governor="powersave", driver="intel_pstate")
    assert condition_flags(conditions(**ps), conditions(**ps)) == []
    assert condition_flags(conditions(load=4.5), conditions()) == ["load above cores"]
    assert condition_flags(conditions(load=3.9), conditions(load=9.0)) == []  # at the start only
    assert condition_flags(conditions(), conditions(temp=HOT_C)) == ["hot"]
    assert condition_flags(conditions(), conditions(temp=HOT_C - 0.5)) == []


def test_pmic_die_placeholder_is_not_hot(tmp_path):
    """Jetson Nano's zones; NVIDIA's PMIC-Die always reads 100 C whatever the temperature."""
    thermal(tmp_path, {0: ("AO-therm", 39500), 1: ("CPU-therm", 34500), 2: ("GPU-therm", 33000),
                       3: ("PLL-therm", 32000), 4: ("PMIC-Die", 100000), 5: ("thermal-fan-est", 33750)})
    c = read_conditions(tmp_path, NO_TOOLS)
    assert c["thermal"][4] == {"zone": "thermal_zone4", "type": "PMIC-Die", "temp_c": 100.0}
    assert condition_flags(c, c) == []


# ---------------------------------------------------------------- power sensors


def test_orin_nano_ina3221_input_rail(tmp_path):
    """VDD_IN alone (the others are parts of it): 5000 mV x 1200 mA = 6.0 W; the shunt voltages
    (in4-6) and the sums (in7, curr4) are never read as rails."""
    root = jetson_orin_nano(tmp_path)
    started: List[str] = []
    sensor = find_power_sensor(root, NO_TOOLS, lambda argv: started.append(argv[0]))
    assert isinstance(sensor, PowerSensor)
    assert sensor.name == "ina3221:VDD_IN"
    assert sensor.read_w() == pytest.approx(6.0)
    assert started == []  # tegrastats is the fallback: not started when hwmon has the rails


def test_agx_orin_two_ina3221_without_input_rail_sums_the_rails(tmp_path):
    ina3221(tmp_path, 1, "1-0040", {1: ("VDD_GPU_SOC", 5000, 400), 2: ("VDD_CPU_CV", 5000, 200),
                                    3: ("VIN_SYS_5V0", 5000, 600)})
    ina3221(tmp_path, 2, "1-0041", {1: ("NC", 5000, 999), 2: ("VDDQ_VDD2_1V8AO", 5000, 100),
                                    3: ("NC", 5000, 999)})
    sensor = find_power_sensor(tmp_path, NO_TOOLS, no_stream)
    assert sensor.name == "ina3221:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO"
    assert sensor.read_w() == pytest.approx(2.0 + 1.0 + 3.0 + 0.5)  # NC channels left out


def test_disabled_ina3221_channel_is_left_out(tmp_path):
    ina3221(tmp_path, 1, "1-0040", {1: ("VDD_GPU_SOC", 5000, 400), 2: ("VDD_CPU_CV", 5000, 200)})
    write(tmp_path, "sys/class/hwmon/hwmon1/in2_enable", "0")
    assert find_power_sensor(tmp_path, NO_TOOLS, no_stream).name == "ina3221:VDD_GPU_SOC"


def test_pi5_pmic_sum_of_rails(tmp_path):
    assert sum(parse_pmic_read_adc(PMIC_READ_ADC).values()) == pytest.approx(PMIC_WATTS)
    assert set(parse_pmic_read_adc(PMIC_READ_ADC)).isdisjoint({"EXT5V", "BATT"})  # no current
    sensor = find_power_sensor(raspberry_pi5(tmp_path), fake_run(PI5_TOOLS), no_stream)
    assert sensor.name == "rpi5-pmic"
    assert sensor.read_w() == pytest.approx(PMIC_WATTS)


def test_pi4_has_no_pmic(tmp_path):
    run = fake_run({"vcgencmd get_throttled": "throttled=0x0\n",
                    "vcgencmd pmic_read_adc": 'error=1 error_msg="Command not registered"\n'})
    assert find_power_sensor(raspberry_pi5(tmp_path), run, no_stream) is None


def test_rapl_packages_only(tmp_path):
    sensor = find_power_sensor(rapl(tmp_path), NO_TOOLS, no_stream)
    assert sensor.name == "rapl:package-0" and sensor.energy_counter
    assert sensor.read_counters() == (1000,)  # not core/uncore/dram, psys or the MMIO duplicate
    two = find_power_sensor(rapl(tmp_path / "2s", packages=2), NO_TOOLS, no_stream)
    assert two.name == "rapl:package-0+package-1"


def test_rapl_counter_wrap(tmp_path):
    assert counter_delta(RAPL_MAX - 1_000_000, 2_000_000, RAPL_MAX) == 3_000_000
    assert counter_delta(5, 9, RAPL_MAX) == 4
    two = find_power_sensor(rapl(tmp_path, packages=2), NO_TOOLS, no_stream)
    # package 0 wraps (3 J), package 1 counts on (2 J)
    assert two.delta_j((RAPL_MAX - 1_000_000, 10_000_000), (2_000_000, 12_000_000)) == pytest.approx(5.0)


def test_rapl_root_only_gives_error_result(tmp_path):
    result = find_power_sensor(rapl(tmp_path), NO_TOOLS, no_stream, opener=denied)
    assert set(result) == {"sensor", "error"} and result["sensor"] == "rapl:package-0"
    assert "Permission denied" in result["error"] and "root only since Linux 5.10" in result["error"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: mode 000 does not stop root reading (denied opener covers it)")
def test_rapl_mode_000_gives_error_result(tmp_path):
    rapl(tmp_path)
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").chmod(0)
    assert find_power_sensor(tmp_path, NO_TOOLS, no_stream)["sensor"] == "rapl:package-0"


def test_readable_sensor_wins_over_an_unreadable_one(tmp_path):
    rapl(tmp_path)
    device(tmp_path, "sys/class/hwmon/hwmon3", "sys/devices/platform/soc/i2c-1/1-0045/hwmon/hwmon3",
           {"name": "ina219", "power1_input": "3200000", "in1_input": "5000", "curr1_input": "640"})
    sensor = find_power_sensor(tmp_path, NO_TOOLS, no_stream, opener=denied)
    assert sensor.name == "hwmon:ina219" and sensor.read_w() == pytest.approx(3.2)  # uW


@pytest.mark.parametrize("line, name, watts", [
    (ORIN_NANO_TEGRASTATS, "tegrastats:VDD_IN", 4.556),  # the current reading, not the average
    (NANO_JETPACK4_TEGRASTATS, "tegrastats:POM_5V_IN", 2.398),
    (AGX_ORIN_TEGRASTATS, "tegrastats:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO", 8.7),
])
def test_tegrastats_fallback(tmp_path, line, name, watts):
    lines = FakeLines(line)
    sensor = find_power_sensor(tmp_path, NO_TOOLS, lambda argv: lines)
    assert sensor.name == name and sensor.read_w() == pytest.approx(watts)
    sensor.close()
    assert lines.closed


def test_tegrastats_without_rails_is_no_sensor_and_is_stopped(tmp_path):
    lines = FakeLines("RAM 2147/7620MB (lfb 2x4MB) SWAP 1476/3810MB (cached 1MB) CPU [0%@729]")
    assert find_power_sensor(tmp_path, NO_TOOLS, lambda argv: lines) is None
    assert lines.closed


# ---------------------------------------------------------------- sampling and the summary


class ConstantSensor(PowerSensor):
    def __init__(self, watts: float, fail_after: Optional[int] = None):
        self.name, self.watts, self.reads, self.fail_after = "hwmon:test", watts, 0, fail_after

    def read_w(self) -> float:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError(5, "Input/output error")
        return self.watts


def test_power_summary_known_answers():
    # instant samples: mean 6 W over 2 s = 12 J; idle 4 W x 2 s = 8 J; net 4 J / 1000 = 4 mJ
    s = power_summary("ina3221:VDD_IN", [5.0, 5.0, 7.0, 7.0], 2.0, 4.0, 1000)
    assert s == {"sensor": "ina3221:VDD_IN", "mean_w": 6.0, "p90_w": 7.0, "idle_w": 4.0,
                 "energy_mj_per_inference": 4.0, "window_s": 2.0}
    # a counter's energy is exact: 30 J / 2 s = 15 W; net 30 - 10 x 2 = 10 J / 500 = 20 mJ;
    # p90 of [14, 16] = 14 + 0.9 x 2
    s = power_summary("rapl:package-0", [14.0, 16.0], 2.0, 10.0, 500, energy_j=30.0)
    assert s == {"sensor": "rapl:package-0", "mean_w": 15.0, "p90_w": 15.8, "idle_w": 10.0,
                 "energy_mj_per_inference": 20.0, "window_s": 2.0}


def test_power_summary_never_negative_and_exact_keys():
    s = power_summary("rpi5-pmic", [3.0, 3.0], 2.0, 3.5, 100)
    assert set(s) == SUMMARY_KEYS and s["energy_mj_per_inference"] == 0.0
    assert power_summary("rpi5-pmic", [], 2.0, 1.0, 10) == {"sensor": "rpi5-pmic",
                                                            "error": "no power reading in the window"}


def test_sampler_and_idle_baseline():
    sensor = ConstantSensor(5.0)
    idle = idle_baseline(ConstantSensor(2.0), seconds=0.1, interval_s=0.02)
    with PowerSampler(sensor, interval_s=0.02) as sampler:
        time.sleep(0.2)
    summary = sampler.summary(idle, inferences=100)
    assert idle == 2.0 and len(sampler.samples) >= 3
    assert set(summary) == SUMMARY_KEYS and summary["mean_w"] == 5.0 and summary["idle_w"] == 2.0
    assert summary["energy_mj_per_inference"] == pytest.approx(3.0 * sampler.window_s * 10, rel=1e-3)
    t0, t1 = sampler.samples[1][0], sampler.samples[-1][0]
    assert sampler.watts_between(t0, t1) == [5.0] * (len(sampler.samples) - 1)


def test_sensor_failing_mid_window_gives_error_result():
    with PowerSampler(ConstantSensor(5.0, fail_after=2), interval_s=0.01) as sampler:
        time.sleep(0.1)
    assert sampler.summary(1.0, 10) == {"sensor": "hwmon:test", "error": "[Errno 5] Input/output error"}
    with pytest.raises(SensorReadError) as info:
        idle_baseline(ConstantSensor(5.0, fail_after=0), seconds=0.05)
    assert info.value.result == {"sensor": "hwmon:test", "error": "[Errno 5] Input/output error"}


def test_rapl_sampler_across_a_wrap(tmp_path):
    """A 10 W package whose counter starts 0.5 J below its wrap: the window's energy and mean
    come out as if it had not wrapped."""
    rapl(tmp_path)
    t0, start = time.monotonic(), RAPL_MAX - 500_000

    def counting(path: Path) -> str:
        if path.name == "energy_uj":
            return str((start + int(10e6 * (time.monotonic() - t0))) % RAPL_MAX)
        return sensors.read_text(path)

    sensor = find_power_sensor(tmp_path, NO_TOOLS, no_stream, opener=counting)
    with PowerSampler(sensor, interval_s=0.02) as sampler:
        time.sleep(0.3)
    assert sampler.energy_j > 0.5  # past the wrap
    s = sampler.summary(idle_w=4.0, inferences=60)
    assert s["mean_w"] == pytest.approx(10.0, rel=0.05)
    assert s["energy_mj_per_inference"] == pytest.approx(6.0 * s["window_s"] / 60 * 1e3, rel=0.05)
    assert all(w == pytest.approx(10.0, rel=0.5) for _, w in sampler.samples)


# ---------------------------------------------------------------- standalone


def test_imports_only_stdlib_numpy_and_the_agent():
    """The agent ships alone to devices: the standard library, numpy and relative imports."""
    tree = ast.parse(Path(sensors.__file__).read_text(encoding="utf-8"))
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, f"sensors.py imports {name}"
