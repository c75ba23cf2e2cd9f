"""Statistics collection and its disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import calibration.runtime as runtime
from calibration.data import CalibrationSet
from calibration.observers import compute_ranges
from calibration.stats import collect_statistics


@pytest.fixture()
def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count batched model runs made through calibration.runtime.run_batches."""
    calls = [0]
    real = runtime.run_batches

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "run_batches", counting)
    return calls


def test_stats_match_numpy_and_cache_skips_the_model(
    tiny_cnn: Path, calib_samples: np.ndarray, tmp_path: Path, count_runs: list[int]
) -> None:
    import onnx

    from calibration.graph import model_with_outputs
    from calibration.runtime import make_session

    calib = CalibrationSet.from_arrays(calib_samples)
    s1 = collect_statistics(tiny_cnn, calib, tmp_path, batch_size=7)
    assert not s1.cache_hit and s1.model_runs == 2 and count_runs[0] == 2
    assert set(s1.tensors) >= {"x", "c1", "r1", "c2", "r2", "gap", "flat", "logits"}
    # min / max / histogram mass agree with a direct run
    sess = make_session(model_with_outputs(onnx.load(str(tiny_cnn)), ["c2", "r1"]).SerializeToString())
    c2, r1 = sess.run(["c2", "r1"], {"x": calib_samples})
    t = s1["c2"]
    assert t.min == pytest.approx(float(c2.min())) and t.max == pytest.approx(float(c2.max()))
    assert t.hist.sum() == c2.size == t.count
    assert s1["r1"].zeros == int(np.count_nonzero(r1 == 0)) > 0  # ReLU zeros counted exactly

    # another method from the same statistics: cache hit, no model run
    s2 = collect_statistics(tiny_cnn, calib, tmp_path, batch_size=7)
    assert s2.cache_hit and s2.model_runs == 0 and count_runs[0] == 2
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert compute_ranges(s2, method) == compute_ranges(s1, method)

    # other data or other options: a new key, so the model runs again
    collect_statistics(tiny_cnn, calib.subset(range(10)), tmp_path)
    assert count_runs[0] == 4
    collect_statistics(tiny_cnn, calib, tmp_path, bins=1024)
    assert count_runs[0] == 6
