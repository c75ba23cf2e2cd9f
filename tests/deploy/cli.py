"""Run the real console script against the ``local`` device (cheap MNIST builds, no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "examples" / "mnist.yaml"
EDGESHIP = Path(sys.executable).with_name("edgeship")  # the console script of this environment


def env_for(tmp_path: Path, stage_cache: Path) -> dict[str, str]:
    return {**os.environ, "EDGESHIP_STAGE_CACHE": str(stage_cache), "COLUMNS": "200"}


def edgeship(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGESHIP), *args], capture_output=True, text=True, env=env, timeout=timeout)


def local_target(folder: Path, device: Path, name: str = "cheapdev", **extra: Any) -> Path:
    """A target extending ``local`` (device folder ``device``), ONNX Runtime fp32 only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    data: dict[str, Any] = {"extends": "local", "name": name,
                            "transport": {"kind": "local", "root": str(device)},
                            "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
                            "validation": {"warmup": 1, "runs": 5}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def agent_pids(device: Path | str) -> list[int]:
    """Live processes on this machine running an agent of the device folder ``device``."""
    needle = f"EDGESHIP_DEVICE_ROOT={device}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z":
                continue
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def small_spec(tmp: Path) -> Path:
    """The MNIST example on 300 evaluation digits: one inference costs ~0.1 s under QEMU."""
    data = yaml.safe_load(MNIST.read_text())
    data["evaluation"]["limit"] = 300
    path = tmp / "mnist-300.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

