"""A test-only fourth INT8 backend on the QDQ writer: it brings only candidates and a ranking
(leave-one-out with its own real candidates, no gated model); method choice, fallback, budget
and report come from calibration.search, as for ONNX Runtime, ncnn and TFLite."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from calibration.api import run_onnx
from calibration.config import CalibrationConfig
from calibration.graph import ensure_node_names, load_model, weighted_layers
from calibration.metrics import sqnr_db
from calibration.plan import float_tensors_for, make_plan
from calibration.search import Arrays, Holdout, Ranking, first
from calibration.sensitivity import LayerSensitivity
from calibration.stats import collect_statistics
from calibration.writers.qdq import write_qdq

CFG = CalibrationConfig(activation_mode="symmetric", bias_correction=False)


@dataclass
class DemoCandidate:
    method: str
    float_layers: tuple[str, ...]
    path: Path

    def run(self, x: Arrays) -> Arrays:
        return run_onnx(self.path, x, CFG)

    def write(self, workdir: Path) -> list[str]:
        shutil.copyfile(self.path, Path(workdir) / "demo.onnx")
        return ["demo.onnx"]

    def notes(self) -> dict[str, Any]:
        return {"format": "demo QDQ", "float": list(self.float_layers)}


class DemoBuilder:
    def __init__(self, onnx_path: Path, fit: Any, work: Path) -> None:
        import onnx

        self.model, self.work, self.count = load_model(onnx_path), work, 0
        ensure_node_names(self.model)
        self.src = work / "named.onnx"
        onnx.save(self.model, str(self.src))
        self.stats = collect_statistics(self.src, fit, None)
        self.layers = weighted_layers(self.model)

    def candidate(self, method: str, float_layers: Sequence[str]) -> DemoCandidate:
        plan = make_plan(self.model, self.stats, self.layers, method, symmetric=True, correct_bias=False)
        self.count += 1
        path = self.work / f"demo_{self.count}.onnx"
        write_qdq(self.src, path, plan.ranges, plan.acts, plan.weights, symmetric=True, per_channel=True,
                  nodes_to_exclude=list(float_layers), float_tensors=float_tensors_for(self.model, list(float_layers)))
        return DemoCandidate(method, tuple(float_layers), path)

    def rank(self, method: str, holdout: Holdout, reference: Arrays) -> Ranking:
        ref = first(reference)

        def db(names: tuple[str, ...]) -> float:
            return sqnr_db(ref, first(self.candidate(method, names).run(holdout.x)))

        base = db(())
        saved = {layer.node: db((layer.node,)) - base for layer in self.layers}
        return Ranking([LayerSensitivity(layer.node, layer.op, float("nan"), saved[layer.node], 0.0)
                        for layer in sorted(self.layers, key=lambda layer: -saved[layer.node])])
