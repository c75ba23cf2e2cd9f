"""``edgeship devices doctor TARGET`` through the real console script, on the ``local`` device.

The board is this machine with a sysfs fixture tree laid out as the kernel documents it (an
INA3221 hwmon, cpufreq) under $EDGESHIP_SENSORS_ROOT, and the STAND-INS of TensorRT and the CUDA
driver (standin.py) on the runtime interpreter's paths (a wrapper script as transport.python):
what is there is reported ok, what is not (a GPU device node) is named, one line per check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.cli import EDGESHIP
from tests.device_build import standin


def _jetson_sysfs(root: Path, governor: str) -> Path:
    hw = root / "sys/class/hwmon/hwmon1"
    hw.mkdir(parents=True)
    for name, text in {"name": "ina3221", "in1_label": "VDD_IN", "in1_input": "5072", "curr1_input": "1104"}.items():
        (hw / name).write_text(text + "\n")
    for cpu in range(2):
        freq = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        freq.mkdir(parents=True)
        (freq / "scaling_governor").write_text(governor + "\n")
        (freq / "scaling_cur_freq").write_text("1510400\n")
    return root


def _doctor(tmp_path: Path, governor: str, with_standins: bool) -> subprocess.CompletedProcess[str]:
    paths = ""
    if with_standins:
        libcuda = standin.write_libcuda(tmp_path / "lib")
        if libcuda is None:
            pytest.skip("no C compiler to build the stand-in libcuda.so.1")
        paths = (f'export PYTHONPATH="$PYTHONPATH:{standin.write_tensorrt(tmp_path / "py")}" '
                 f'LD_LIBRARY_PATH="{libcuda}"\n')
    python = tmp_path / "python"  # the board's runtime interpreter
    python.write_text(f"#!/bin/sh\n{paths}exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    (tmp_path / "board.yaml").write_text(yaml.safe_dump({
        "name": "board", "extends": "local",
        "transport": {"kind": "local", "root": str(tmp_path / "device"), "python": str(python)}}))
    env = {**os.environ, "EDGESHIP_SENSORS_ROOT": str(_jetson_sysfs(tmp_path / "sysroot", governor))}
    return subprocess.run([str(EDGESHIP), "devices", "doctor", str(tmp_path / "board.yaml")], capture_output=True,
                          text=True, env=env, timeout=120)


def test_doctor_reports_each_check_on_one_line(tmp_path: Path) -> None:
    proc = _doctor(tmp_path, "schedutil", with_standins=True)
    lines = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("board: ")}
    assert list(lines) == ["tensorrt", "cuda", "gpu", "power", "clocks"], proc.stdout + proc.stderr
    assert " ok " in lines["tensorrt"] and "TensorRT 10.3.0 (python module)" in lines["tensorrt"]
    assert " ok " in lines["cuda"] and f"{standin.STANDIN_GPU}, compute capability {standin.STANDIN_CC}" in lines["cuda"]
    assert " ok " in lines["power"] and "ina3221:VDD_IN" in lines["power"]
    assert " ok " in lines["clocks"] and "cpufreq governor schedutil on 2 cores" in lines["clocks"]
    if any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")):
        pytest.skip("this machine has an NVIDIA GPU node: the missing-GPU line cannot be shown here")
    assert "MISSING no NVIDIA GPU device node" in lines["gpu"]
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "edgeship: error: missing on board: board gpu"


def test_doctor_names_what_a_plain_machine_lacks(tmp_path: Path) -> None:
    proc = _doctor(tmp_path, "powersave", with_standins=False)
    out = proc.stdout
    assert proc.returncode == 1
    assert "board: tensorrt MISSING tensorrt is not installed on " in out and "JetPack 6 ships it" in out
    assert "board: cuda     MISSING no CUDA driver on " in out
    assert "board: clocks   MISSING cpufreq governor powersave on 2 cores: powersave slows every timed run" in out
