"""The agent's interleaved measurement (issue 17, "Latency you can believe"), on a real ONNX
Runtime model in a hand-made release, through the agent package exactly as it ships
(``edgeship_agent``, a copy of pipeline/agent, nothing else of ours importable)."""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.backend("onnxruntime")


def _matmul_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _release(folder: Path, ids: list[str], runs: int, rounds: int, **agent: Any) -> Path:
    """A release with one ONNX model and a run per id; an id starting 'broken' gets a corrupt model."""
    (folder / "data").mkdir(parents=True)
    np.save(folder / "data" / "x.npy", np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32))
    entries = []
    for rid in ids:
        (folder / "artifacts" / rid).mkdir(parents=True)
        if rid.startswith("broken"):
            (folder / "artifacts" / rid / "m.onnx").write_bytes(b"not an onnx model")
        else:
            _matmul_model(folder / "artifacts" / rid / "m.onnx")
        entries.append({"id": rid, "backend": "onnxruntime", "precision": "fp32", "runner": "onnxruntime",
                        "dir": f"artifacts/{rid}", "config": {"model": "m.onnx"}})
    manifest = {"release_id": "r1", "agent": {"eval_dir": "data", "threads": 1, "warmup": 2, "runs": runs,
                                              "rounds": rounds, "batch": 1, **agent}, "runs": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(ROOT / "pipeline" / "agent", folder / "edgeship_agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The shipped agent package imported as ``edgeship_agent`` from a release folder. It reads the
    board from an empty tree unless a test lays one out: this shared machine's own load would
    otherwise flag runs unstable at random."""
    (tmp_path / "no-board").mkdir()
    monkeypatch.setenv("EDGESHIP_SENSORS_ROOT", str(tmp_path / "no-board"))
    release = tmp_path / "release"
    release.mkdir()
    shutil.copytree(ROOT / "pipeline" / "agent", release / "edgeship_agent", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(release))
    for name in [m for m in sys.modules if m == "edgeship_agent" or m.startswith("edgeship_agent.")]:
        monkeypatch.delitem(sys.modules, name)
    yield importlib.import_module("edgeship_agent.rounds")


def test_chunks_split_the_runs_evenly_over_the_rounds(agent: Any) -> None:
    assert agent.chunks(100, 5) == [20] * 5
    assert agent.chunks(7, 3) == [3, 2, 2]
    assert agent.chunks(2, 5) == [1, 1]  # never an empty round


def test_runs_are_timed_in_rotated_interleaved_rounds(agent: Any, tmp_path: Path) -> None:
    release = _release(tmp_path / "r", ["a", "b", "c"], runs=9, rounds=3)
    order: list[str] = []

    @contextlib.contextmanager
    def window(rid: str) -> Iterator[None]:
        order.append(rid)
        yield

    manifest = json.loads((release / "manifest.json").read_text())
    m, results = agent.measure_runs(release, manifest["runs"], manifest["agent"], 60.0, window)
    # A B C, then B C A, then C A B: every run takes every position once.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for rid in "abc":
        r = results[rid]
        assert r["error"] is None and len(r["timings_ms"]) == 9 and r["latency_ms"]["runs"] == 9
        assert r["latency_ms"]["rounds"] == 3 and r["latency_ms"]["retries"] == 0
        assert min(r["timings_ms"]) == r["latency_ms"]["min"] and r["latency_ms"]["cv"] is not None
        assert r["samples"] == 8 and r["peak_rss_mb"] > 0
    assert m.failed == {}
    # Every chunk waited for the other workers' threads to go idle first (settle.py), and says so.
    assert len(m.settled_s) == 9 and m.conditions["settle_ms"]["n"] == 9
    assert 0 < m.conditions["settle_ms"]["max"] < 1000 * sys.modules["edgeship_agent.settle"].CAP_S + 100
    # One process per run, all gone once the measurement is over.
    assert all(w.proc.poll() is not None for w in m.workers.values())


def test_a_broken_run_fails_alone_with_its_reason(agent: Any, tmp_path: Path) -> None:
    release = _release(tmp_path / "r", ["a", "broken-b", "c"], runs=4, rounds=2)
    manifest = json.loads((release / "manifest.json").read_text())
    m, results = agent.measure_runs(release, manifest["runs"], manifest["agent"], 60.0)
    assert set(results) == {"a", "c"} and "broken-b" in m.failed
    assert "INVALID_PROTOBUF" in m.failed["broken-b"] or "Protobuf" in m.failed["broken-b"], m.failed


def test_unstable_runs_are_measured_again(agent: Any, tmp_path: Path) -> None:
    # max_cv so small that every run is unstable: each is re-measured retry_unstable times.
    release = _release(tmp_path / "r", ["a", "b"], runs=6, rounds=2, max_cv=1e-12, retry_unstable=2)
    manifest = json.loads((release / "manifest.json").read_text())
    _, results = agent.measure_runs(release, manifest["runs"], manifest["agent"], 60.0)
    for r in results.values():
        assert r["latency_ms"]["retries"] == 2 and r["latency_ms"]["unstable"] is True
        assert len(r["timings_ms"]) == 6  # the last measurement replaces the earlier ones
    release2 = _release(tmp_path / "r2", ["a"], runs=6, rounds=2, max_cv=1e9, retry_unstable=2)
    manifest = json.loads((release2 / "manifest.json").read_text())
    _, results = agent.measure_runs(release2, manifest["runs"], manifest["agent"], 60.0)
    assert results["a"]["latency_ms"]["retries"] == 0 and results["a"]["latency_ms"]["unstable"] is False


def test_agent_command_line_keeps_its_json_clean(tmp_path: Path) -> None:
    """Whatever a runtime prints in a worker goes to stderr; stdout stays one JSON document."""
    release = _release(tmp_path / "r", ["a", "broken-b"], runs=4, rounds=2)
    proc = subprocess.run([sys.executable, "-m", "edgeship_agent", "run", "--release", "."], cwd=release,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(release)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_id = {r["id"]: r for r in doc["results"]}
    assert by_id["a"]["error"] is None and len(by_id["a"]["timings_ms"]) == 4
    assert by_id["broken-b"]["error"]


def _board(root: Path, watts: float) -> Path:
    """A sysfs/procfs tree as the kernel lays it out: one core under the powersave governor
    (acpi-cpufreq, a fixed-policy driver), a 45 C zone, a hwmon device reading ``watts``."""
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "loadavg").write_text("0.10 0.20 0.30 1/100 4242\n")
    cpu = root / "sys/devices/system/cpu"
    (cpu / "cpu0" / "cpufreq").mkdir(parents=True)
    (cpu / "online").write_text("0\n")
    for name, value in {"scaling_governor": "powersave", "scaling_driver": "acpi-cpufreq",
                        "scaling_cur_freq": "800000", "scaling_min_freq": "800000",
                        "scaling_max_freq": "3000000"}.items():
        (cpu / "cpu0" / "cpufreq" / name).write_text(value + "\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("x86_pkg_temp\n")
    (zone / "temp").write_text("45000\n")
    hw = root / "sys/class/hwmon/hwmon0"
    hw.mkdir(parents=True)
    (hw / "name").write_text("board_power\n")
    (hw / "power1_input").write_text(f"{int(watts * 1e6)}\n")  # microwatts
    return root


def test_conditions_and_power_come_from_the_boards_own_sensors(agent: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_SENSORS_ROOT", str(_board(tmp_path / "board", 4.5)))
    release = _release(tmp_path / "r", ["a", "b"], runs=6, rounds=2)
    manifest = json.loads((release / "manifest.json").read_text())
    m, results = agent.measure_runs(release, manifest["runs"], manifest["agent"], 60.0)
    assert m.conditions["before"]["cpufreq"]["cpu0"]["governor"] == "powersave"
    assert m.conditions["after"]["thermal"][0]["temp_c"] == 45.0
    assert "powersave governor" in m.conditions["flags"]
    # Timings taken under the powersave governor are flagged, whatever their spread.
    assert all("powersave governor" in r["latency_ms"]["unstable_why"] and r["latency_ms"]["unstable"]
               for r in results.values())
    for r in results.values():
        p = r["power"]
        # A constant 4.5 W, idle included: mean 4.5 W, nothing above idle, over a >= 2 s window.
        assert p["sensor"] == "hwmon:board_power" and p["mean_w"] == 4.5 and p["idle_w"] == 4.5
        assert p["energy_mj_per_inference"] == 0.0 and p["window_s"] >= 2.0
        assert len(r["timings_ms"]) == 6  # the power phase's inferences are not latency samples


def test_no_sensor_is_said_honestly(agent: Any, tmp_path: Path) -> None:
    release = _release(tmp_path / "r", ["a"], runs=4, rounds=2)
    manifest = json.loads((release / "manifest.json").read_text())
    m, results = agent.measure_runs(release, manifest["runs"], manifest["agent"], 60.0)
    assert results["a"]["power"] is None and m.conditions["flags"] == []
