"""pipeline.agent.sensors against fixture trees laid out as the kernel and the vendors document
them (sysfs classes as symlinks into /sys/devices, units as the ABI files state) and captured tool
output handed in through a fake ``run``. Known answers are worked out by hand in each test."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from pipeline.agent import sensors
from pipeline.agent.sensors import HOT_C, condition_flags, parse_throttled, read_conditions


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

def raspberry_pi5(root: Path, temp_millideg: int = 52100) -> Path:
    write(root, "proc/loadavg", "4.50 2.10 1.00 5/230 1200")
    cpus(root, 4, "ondemand", "cpufreq-dt", 2400000, 1500000, 2400000)
    thermal(root, {0: ("cpu-thermal", temp_millideg)})
    device(root, "sys/class/hwmon/hwmon0", "sys/devices/virtual/thermal/thermal_zone0/hwmon0",
           {"name": "cpu_thermal", "temp1_input": str(temp_millideg)})
    return root


PI5_TOOLS = {"vcgencmd get_throttled": "throttled=0x50005\n"}

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


def test_chroot_without_sys(tmp_path):
    """The emulated devices: a chroot with /proc mounted and no /sys."""
    write(tmp_path, "proc/loadavg", "1.00 0.50 0.25 2/100 42")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n")
    c = read_conditions(tmp_path, NO_TOOLS)
    assert c == {"loadavg": {"1m": 1.0, "5m": 0.5, "15m": 0.25}, "cpus": 2, "cpufreq": {}, "thermal": []}
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
    """Whatever this host is (an x86 VM here), conditions read."""
    c = read_conditions()
    assert c["loadavg"] is not None and c["cpus"] >= 1


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
