"""The spec's one metric through the console script (issue 13): the detector example deploys on
`local` with every CPU backend at fp32/fp16/int8, scored on the host with mAP from the raw outputs
the agent returns after the shipped postprocess; bad input to the metric is one line with its exit
code (shared/decisions.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import MNIST, edgeship, lines, make_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DETECTOR = ROOT / "examples" / "detector.yaml"


def _target(tmp_path: Path, precisions: list[str], backends: tuple[str, ...] = ("onnxruntime", "tflite", "ncnn"),
            runs: int = 5) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump({
        "extends": "local", "name": "dev", "transport": {"kind": "local", "root": str(tmp_path / "device")},
        "builds": [{"backend": b, "precisions": precisions} for b in backends],
        "validation": {"warmup": 1, "runs": runs, "rounds": 1}}))
    return path


@pytest.mark.slow
def test_detector_deploys_on_every_cpu_backend_and_passes_its_map_gate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    got = edgeship(["deploy", "-s", str(DETECTOR), "-t", str(_target(tmp_path, ["fp32", "fp16", "int8"])),
                    "-o", str(out)], make_env(tmp_path), timeout=1200)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    ref = results["reference"]
    assert ref["metric"] == "map" and ref["higher_is_better"] and 55.0 < ref["accuracy"] < 80.0
    assert set(ref["metrics"]) == {"map50", "map75"}
    rows = {r["id"]: r for r in results["runs"]}
    assert len(rows) == 9
    for rid, row in rows.items():
        assert row["gate"]["passed"], row["gate"]
        # the primary value is the host's mAP of this run's outputs; its extras ride beside it
        assert set(row["metrics"]) == {"map50", "map75"} and "outputs" not in row
        assert row["accuracy_drop_pp"] == pytest.approx(ref["accuracy"] - row["accuracy"], abs=1e-3)
        if rid.endswith("int8"):  # the target: int8 mAP@.5 within 1 point of fp32
            assert ref["metrics"]["map50"] - row["metrics"]["map50"] <= 1.0
    # the raw outputs behind every number: decoded detections, beside results.json
    assert results["outputs_file"] == "outputs.npz"
    with np.load(out / results["outputs_file"]) as side:
        assert side["dev/tflite-int8/boxes"].shape == (512, 20, 4) and side["dev/ncnn-fp16/scores"].shape == (512, 20)
    # the postprocess ships in the release; the labels stay on the host, beside it
    release = out / "release"
    assert (release / "postprocess" / "detector_post.py").is_file() and not (release / "data" / "y.npy").exists()
    assert json.loads((out / "evaluation" / "labels.json").read_text())["objects"][0]["boxes"]
    # the ONNX Runtime INT8 search chose its method on the holdout's mAP
    cal = json.loads((release / "manifest.json").read_text())["runs"]
    ort = next(r for r in cal if r["id"] == "onnxruntime-int8")["conversion"]["calibration"]
    assert ort["metric"] == "map" and "map" in ort["holdout"]


def _spec(tmp_path: Path, base: Path = MNIST, **evaluation: object) -> Path:
    data = yaml.safe_load(base.read_text())
    data["calibration"]["source"]["kwargs"] = {"limit": 64}
    data["evaluation"]["source"]["kwargs"] = {"limit": 64}
    data["evaluation"].update(evaluation)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


USER_METRICS = '''
import numpy as np

def raises(outputs, labels):
    raise ValueError("no such head")

def wrong_type(outputs, labels):
    return "high"

def top1(outputs, labels):
    return {"value": float((next(iter(outputs.values())).argmax(1) == labels).mean() * 100), "n": len(labels)}
'''


@pytest.mark.slow
@pytest.mark.parametrize("evaluation, code, words", [
    ({"metric": {"callable": "mymetrics:raises", "name": "mine"}}, 1,
     "field 'evaluation.metric.callable': mymetrics:raises raised ValueError: no such head"),
    ({"metric": {"callable": "mymetrics:wrong_type", "name": "mine"}}, 1,
     "mymetrics:wrong_type returned str; a metric returns a float"),
    ({"metric": "map"}, 2, "metric map reads outputs ['boxes', 'scores', 'classes']"),
    ({"metric": "map", "postprocess": "mymetrics:top1"}, 1, "mymetrics:top1 raised"),
], ids=["callable-raises", "callable-wrong-type", "map-without-detections", "postprocess-raises"])
def test_bad_metric_input_is_one_line(tmp_path: Path, evaluation: dict, code: int, words: str) -> None:
    (tmp_path / "mymetrics.py").write_text(USER_METRICS)
    got = edgeship(["build", "-s", str(_spec(tmp_path, **evaluation)), "-t", str(_target(tmp_path, ["fp32"],
                                                                                        ("onnxruntime",))),
                    "-o", str(tmp_path / "out")], make_env(tmp_path))
    err = lines(got.stderr)
    assert got.returncode == code, got.stderr[-2000:]
    assert len([ln for ln in err if ln.startswith("edgeship: error:")]) == 1 and words in err[-1], err[-3:]


@pytest.mark.slow
def test_top1_on_a_detector_is_one_line(tmp_path: Path) -> None:
    """top1 on outputs not shaped (N, classes): exit 2, one line."""
    data = yaml.safe_load(DETECTOR.read_text())
    for key in ("calibration", "evaluation"):
        data[key]["source"]["kwargs"] = {"limit": 16}
    data["evaluation"].update(metric="top1", postprocess=None)
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(data))
    got = edgeship(["build", "-s", str(path), "-t", str(_target(tmp_path, ["fp32"], ("onnxruntime",))),
                    "-o", str(tmp_path / "out")], make_env(tmp_path))
    err = lines(got.stderr)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "top1 reads class scores shaped (N, classes) from the model's first output 'output'" in err[-1]


OBJECT_LABELS = '''
from pipeline.workloads.mnist import calibration_split, evaluation_split

def evaluation(limit=None):
    x, y = evaluation_split(limit)
    return x, [{"digit": int(v)} for v in y]
'''


@pytest.mark.slow
def test_labels_the_metric_cannot_read_are_one_line(tmp_path: Path) -> None:
    """Per-sample objects as labels of top1: exit 2, one line naming the source."""
    (tmp_path / "objlabels.py").write_text(OBJECT_LABELS)
    spec = _spec(tmp_path, source={"kind": "python", "callable": "objlabels:evaluation", "kwargs": {"limit": 64}})
    got = edgeship(["build", "-s", str(spec), "-t", str(_target(tmp_path, ["fp32"], ("onnxruntime",))),
                    "-o", str(tmp_path / "out")], make_env(tmp_path))
    err = lines(got.stderr)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "callable objlabels:evaluation" in err[-1] and "integer class indices" in err[-1], err[-1]


@pytest.mark.slow
def test_a_user_metric_beside_the_spec_scores_every_run(tmp_path: Path) -> None:
    (tmp_path / "mymetrics.py").write_text(USER_METRICS)
    spec = _spec(tmp_path, metric={"callable": "mymetrics:top1", "name": "mytop1", "higher_is_better": True})
    out = tmp_path / "out"
    got = edgeship(["deploy", "-s", str(spec), "-t", str(_target(tmp_path, ["fp32", "int8"], ("onnxruntime",))),
                    "-o", str(out)], make_env(tmp_path))
    assert got.returncode == 0, got.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["reference"]["metric"] == "mytop1" and results["reference"]["metrics"] == {"n": 64.0}
    for row in results["runs"]:
        assert row["metrics"] == {"n": 64.0} and row["accuracy"] is not None
