"""Editing the user's metric module beside the spec reruns what it decides (issue 13): the INT8
search scores with it, so the int8 conversion's cache key holds the module file's hash; fp32 does
not run it and stays cached. The reference records which version of the module gave its numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

METRIC = '''
import numpy as np

def top1(outputs, labels):
    return float((next(iter(outputs.values())).argmax(1) == labels).mean() * 100.0)
'''


@pytest.mark.slow
def test_editing_the_metric_module_reruns_the_int8_search(tmp_path: Path) -> None:
    from pipeline.build import build
    from pipeline.cache import Cache
    from pipeline.spec import BuildSpec, load_spec, load_target

    (tmp_path / "mine.py").write_text(METRIC)
    data = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
    for key in ("calibration", "evaluation"):
        data[key]["source"]["kwargs"] = {"limit": 64}
    data["calibration"].update(method="minmax", fallback=False)
    data["evaluation"]["metric"] = {"callable": "mine:top1", "name": "mytop1"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    target = load_target("local").model_copy(deep=True)
    target.builds = [BuildSpec(backend="onnxruntime", precisions=["fp32", "int8"])]

    def cached() -> tuple[dict[str, bool], dict]:
        res = build(load_spec(tmp_path / "spec.yaml"), target, tmp_path / "out", cache=Cache(tmp_path / "cache"),
                    log=lambda s: None)
        return {e.stage: e.cached for e in res.events}, res.reference_metric

    first, ref1 = cached()
    assert not first["onnxruntime int8"] and set(ref1["sources"]) == {"mine:top1"}
    again, _ = cached()
    assert again["onnxruntime int8"] and again["onnxruntime fp32"]
    (tmp_path / "mine.py").write_text(METRIC.replace("* 100.0", "* 100.0  # percent"))
    edited, ref2 = cached()
    assert not edited["onnxruntime int8"], edited  # the search scored with the old module: rerun
    assert edited["onnxruntime fp32"] and edited["optimize (fold, slim)"]  # nothing else ran it
    assert ref2["sources"]["mine:top1"] != ref1["sources"]["mine:top1"]
