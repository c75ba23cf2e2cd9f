"""The INT8 search sees every output (issue 13): on ``planted_two_heads`` only the second output
(``planted``) is ruined by int8, so each builder's candidates must return it for the search to
notice the drop and keep the planted branch's layer in float. A search scoring only the first
output (``clean``) would find no drop, keep nothing float and ship the ruined head."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.registry import get_backend
from tests.backends.helpers import planted_two_heads_context

# the planted branch's second conv (reads the x300 channel), as each backend names it
PLANTED_LAYER = {"onnxruntime": "node_conv2d_2", "tflite": "planted.2", "ncnn": "convrelu"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "tflite", "ncnn"])
def test_the_int8_search_scores_every_output(tmp_path: Path, backend: str) -> None:
    ctx = planted_two_heads_context(tmp_path, backend)
    art = get_backend(backend).convert(ctx, "int8")
    cal = art.info["calibration"]
    assert cal["metric"] == "top1_agreement"
    assert cal["method_scores"][cal["method"]]["drop_pp"] > 10.0  # only the second output shows the damage
    assert cal["budget_met"] is True and cal["holdout"]["drop_pp"] <= 10.0, cal["holdout"]
    names = [f["name"] for f in cal["fallback_layers"]]
    assert len(names) == 1 and PLANTED_LAYER[backend] in names[0], names
    assert set(art.info["check"]["outputs"]) == {"clean", "planted"}  # the conversion check holds both
