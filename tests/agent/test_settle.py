"""settle.py: before a timed chunk, wait for other processes' (and our own pool threads') idle
spinning to end, on real processes and a real ONNX Runtime thread pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.agent.settle import STEP_S, cpu_ticks, settle

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _child(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"go\n"  # started, past the import
    return proc


SPIN_THEN_SLEEP = ("import sys, time\nprint('go', flush=True)\nt = time.time()\n"
                   "while time.time() - t < {spin}: pass\ntime.sleep(60)\n")


def test_cpu_ticks_counts_a_busy_process_and_not_a_sleeping_one() -> None:
    busy, idle = _child(SPIN_THEN_SLEEP.format(spin=60)), _child(SPIN_THEN_SLEEP.format(spin=0))
    try:
        b0, i0 = cpu_ticks(busy.pid), cpu_ticks(idle.pid)
        time.sleep(0.2)
        assert cpu_ticks(busy.pid) - b0 >= 5  # ~20 ticks at 100 Hz for 0.2 s on a core
        assert cpu_ticks(idle.pid) == i0
    finally:
        busy.kill(), idle.kill(), busy.wait(), idle.wait()
    assert cpu_ticks(busy.pid) is None  # gone


def test_settle_waits_out_a_spinning_process_and_not_a_quiet_one() -> None:
    spinner = _child(SPIN_THEN_SLEEP.format(spin=0.4))
    try:
        waited = settle([spinner.pid])
        assert 0.25 <= waited < 0.9, waited  # the rest of its 0.4 s spin, then one quiet window
        assert settle([spinner.pid]) < 2.5 * STEP_S  # quiet now: one window
    finally:
        spinner.kill(), spinner.wait()


def test_settle_gives_up_at_its_cap_on_a_process_that_never_rests() -> None:
    spinner = _child(SPIN_THEN_SLEEP.format(spin=60))
    try:
        assert 0.3 <= settle([spinner.pid], cap_s=0.3) < 0.3 + 2 * STEP_S
    finally:
        spinner.kill(), spinner.wait()
    assert settle([spinner.pid, 999999999]) < 2.5 * STEP_S  # processes that are gone count as quiet


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="ONNX Runtime's pool has no second thread to spin on one core")
def test_onnx_runtime_pool_threads_spin_after_a_run_and_settle_outlasts_them() -> None:
    """The reason settle exists: after a 2-thread Run, ORT's pool thread keeps a core busy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 64, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64, 56, 56), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    t0 = cpu_ticks(os.getpid())
    time.sleep(STEP_S)  # this thread sleeps: any CPU time now is the pool's
    assert cpu_ticks(os.getpid()) - t0 >= 1
    sess.run(None, {"x": x})
    assert settle([os.getpid()]) >= 2 * STEP_S  # at least one busy window before a quiet one
    t1 = cpu_ticks(os.getpid())
    time.sleep(STEP_S)
    assert cpu_ticks(os.getpid()) - t1 <= 1  # and quiet after it
