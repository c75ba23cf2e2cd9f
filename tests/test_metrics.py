"""The metric registry (pipeline/metrics.py) and the raw outputs the agent returns (issue 13).

The agent runs a real release (the three-output model on ONNX Runtime, int8 and fp32) in its
worker processes and returns every output packed in its JSON reply; the host's top1 from those
outputs equals the device's fast path, the postprocess runs on the device per batch exactly as on
the host's fp32 outputs, and each metric's bad input is one line with its exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import InputFileError, SpecError, UserCodeError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "backends"))


def _release(tmp: Path) -> Any:
    from test_multi_io import build_on, three_output_spec

    names = ["scores", "heat", "emb"]
    return build_on("onnxruntime", three_output_spec(tmp, names), tmp, ["fp32", "int8"])


def _measure(release: Path, outputs: dict[str, Any]) -> dict[str, Any]:
    """The agent as it ships (imported from the release), told to return raw outputs."""
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["agent"].update(runs=4, warmup=1, rounds=1, outputs=outputs)
    (release / "manifest.json").write_text(json.dumps(manifest))
    sys.path.insert(0, str(release))
    try:
        import edgeship_agent.rounds as rounds

        _, results = rounds.measure_runs(release, manifest["runs"], manifest["agent"], 120.0)
    finally:
        sys.path.remove(str(release))
        for name in [m for m in sys.modules if m.startswith("edgeship_agent")]:
            del sys.modules[name]
    return results


@pytest.mark.slow
def test_agent_returns_every_output_and_host_top1_equals_the_device_fast_path(tmp_path: Path) -> None:
    from pipeline.agent.outputs import unpack
    from pipeline.metrics import BUILTIN, drop_pp
    from pipeline.stages.export import run_onnx

    built = _release(tmp_path)
    release = built.release_dir
    x = np.load(release / "data" / "x.npy")
    labels = np.arange(len(x)) % 5  # the device's top1 reads y.npy: give it labels
    np.save(release / "data" / "y.npy", labels)
    post = release / "postprocess"
    post.mkdir()
    (post / "pooled.py").write_text("def pool(outputs):\n    return {'scores': outputs['scores'],\n"
                                    "            'heat_mean': outputs['heat'].mean(axis=(2, 3))}\n")
    keep = {"float16": False, "postprocess": {"file": "postprocess/pooled.py", "function": "pool"}}
    results = _measure(release, keep)
    fp32_all = run_onnx(built.artifacts[0].workdir / "model.onnx", x, 1)
    for rid, res in results.items():
        got = unpack(res["outputs"])
        assert list(got) == ["scores", "heat_mean"] and got["heat_mean"].shape == (len(x), 2)
        host = BUILTIN["top1"].evaluate(got, labels)
        assert host.value == res["accuracy"], rid  # the device's fast path and the host agree exactly
        if rid.endswith("fp32"):  # the same function on the host's fp32 outputs
            np.testing.assert_allclose(got["heat_mean"], fp32_all["heat"].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert drop_pp(BUILTIN["top1"], 80.0, 79.5) == 0.5


def test_pack_round_trip_float16_where_allowed() -> None:
    from pipeline.agent.outputs import pack, unpack

    outputs = {"boxes/0": np.linspace(0, 96, 40, dtype=np.float32).reshape(2, 5, 4),
               "classes": np.array([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]], np.int64)}
    exact = unpack(pack(outputs, float16=False))
    assert list(exact) == ["boxes/0", "classes"]
    np.testing.assert_array_equal(exact["boxes/0"], outputs["boxes/0"])
    np.testing.assert_array_equal(exact["classes"], outputs["classes"])
    half = unpack(pack(outputs, float16=True))
    assert half["boxes/0"].dtype == np.float32 and np.abs(half["boxes/0"] - outputs["boxes/0"]).max() <= 0.04
    assert len(pack(outputs, True)) < len(pack(outputs, False))


def test_top1_top5_by_hand() -> None:
    from pipeline.metrics import BUILTIN

    scores = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.6, 0.1, 0.2, 0.05, 0.03, 0.02],
                       [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    labels = np.array([1, 2, 0])  # right at top1 once; label 0 of sample 3 ranks last (6th)
    out = {"logits": scores}
    assert BUILTIN["top1"].evaluate(out, labels).value == pytest.approx(100 / 3, abs=1e-3)
    assert BUILTIN["top5"].evaluate(out, labels).value == pytest.approx(200 / 3, abs=1e-3)


def test_fidelity_per_output_gates_on_the_worst() -> None:
    from pipeline.metrics import BUILTIN

    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=(100, 10)).astype(np.float32), "b": rng.normal(size=(100, 4)).astype(np.float32),
           "heat": rng.normal(size=(100, 2, 3, 3)).astype(np.float32)}
    got = {k: v.copy() for k, v in ref.items()}
    got["b"][:10] = -got["b"][:10]  # 10 samples flipped: their argmax changes
    score = BUILTIN["fidelity"].evaluate(got, None, ref)
    assert score.extras["agreement.a"] == 100.0 and score.value == score.extras["agreement.b"] < 100.0
    assert "agreement.heat" not in score.extras and score.extras["sqnr_db.heat"] == 200.0
    with pytest.raises(SpecError, match="fidelity gates on the top-1 agreement of outputs shaped"):
        BUILTIN["fidelity"].evaluate({"heat": got["heat"]}, None, {"heat": ref["heat"]})


def test_map_reads_the_decided_detection_formats() -> None:
    from pipeline.metrics import BUILTIN

    labels = [{"boxes": [[10, 10, 30, 30]], "classes": [3]}, {"boxes": [[5, 5, 20, 25], [40, 40, 60, 60]],
                                                              "classes": [1, 7]}]
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0], boxes[1, 0], boxes[1, 1] = [10, 10, 30, 30], [5, 5, 20, 25], [40, 40, 60, 60]
    pred = {"boxes": boxes, "scores": np.array([[0.9, 0, 0], [0.8, 0.7, 0]], np.float32),
            "classes": np.array([[3, 0, 0], [1, 7, 0]])}
    perfect = BUILTIN["map"].evaluate(pred, labels)
    assert perfect.value == 100.0 and perfect.extras["map50"] == 100.0
    pred["classes"] = np.array([[3, 0, 0], [1, 2, 0]])  # one detection of the wrong class
    assert BUILTIN["map"].evaluate(pred, labels).value < 100.0
    with pytest.raises(SpecError, match=r"metric map reads outputs .*\['boxes'\] are not among"):
        BUILTIN["map"].evaluate({"scores": pred["scores"], "classes": pred["classes"]}, labels)
    with pytest.raises(InputFileError, match="metric map reads one label per sample"):
        BUILTIN["map"].evaluate(pred, np.array([1, 2]))


def test_bad_input_is_one_line() -> None:
    from pipeline.metrics import BUILTIN

    heat = {"heat": np.zeros((4, 2, 3, 3), np.float32)}
    with pytest.raises(SpecError, match=r"top1 reads class scores shaped \(N, classes\) .* 'heat'") as err:
        BUILTIN["top1"].evaluate(heat, np.zeros(4, np.int64))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    with pytest.raises(InputFileError, match="top1 reads 2 integer class indices as labels, got list"):
        BUILTIN["top1"].evaluate({"y": np.zeros((2, 3), np.float32)}, [{"boxes": []}, {"boxes": []}])
    with pytest.raises(InputFileError, match="label 7 of sample 1 is outside the model's 3 classes"):
        BUILTIN["top1"].evaluate({"y": np.zeros((2, 3), np.float32)}, np.array([0, 7]))


USER_METRIC = '''
import numpy as np

def mean_abs(outputs, labels):
    err = float(np.abs(outputs["y"][:, 0] - labels).mean())
    return {"value": err, "max_err": float(np.abs(outputs["y"][:, 0] - labels).max())}

def raises(outputs, labels):
    return outputs["boxes"]

def wrong_type(outputs, labels):
    return "0.5"
'''


def test_user_metric_beside_the_spec(tmp_path: Path) -> None:
    from pipeline.metrics import drop_pp, user_metric

    (tmp_path / "mymetric.py").write_text(USER_METRIC)
    where = f"{tmp_path / 'spec.yaml'}: field 'evaluation.metric.callable'"
    metric = user_metric("mymetric:mean_abs", "mae", False, tmp_path, where)
    out = {"y": np.array([[1.0], [2.0], [4.0]], np.float32)}
    score = metric.evaluate(out, np.array([1.0, 1.0, 1.0]))
    assert score.value == pytest.approx(4 / 3) and score.extras == {"max_err": 3.0}
    assert drop_pp(metric, 1.0, 1.5) == 0.5  # lower is better: the drop is the increase
    with pytest.raises(UserCodeError, match=r"mymetric:raises raised KeyError: 'boxes'") as err:
        user_metric("mymetric:raises", "x", True, tmp_path, where).evaluate(out, [1, 2, 3])
    assert err.value.exit_code == 1 and str(err.value).startswith(where)
    with pytest.raises(UserCodeError, match="mymetric:wrong_type returned str; a metric returns a float"):
        user_metric("mymetric:wrong_type", "x", True, tmp_path, where).evaluate(out, [1, 2, 3])


def test_counts_samples_only_for_the_builtin_sample_means() -> None:
    """top1, top5 and fidelity move 100/n points per sample (the INT8 check's tolerance and the
    exact intervals rely on it); mAP and a user metric do not, whatever it is called."""
    from pipeline.metrics import BUILTIN, Metric, Score, counts_samples, fidelity

    assert all(counts_samples(m) for m in (BUILTIN["top1"], BUILTIN["top5"], BUILTIN["fidelity"], fidelity(0.5)))
    assert not counts_samples(BUILTIN["map"])
    mine = Metric("top1", True, lambda o, y, r: Score(0.0))
    assert not counts_samples(mine) and not counts_samples(Metric("fidelity", True, mine.compute))
