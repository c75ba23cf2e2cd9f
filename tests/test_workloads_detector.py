"""The digit detector workload: canvases, decoding and COCO mAP with known answers, the trained model."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics_detection import coco_map
from pipeline.workloads import detector
from pipeline.workloads.detector_post import STRIDE, decode


def _padded(boxes: list[list[float]], scores: list[float], classes: list[int], k: int = 5) -> dict[str, np.ndarray]:
    b = np.zeros((1, k, 4), np.float32)
    s = np.zeros((1, k), np.float32)
    c = np.zeros((1, k), np.int64)
    if boxes:
        b[0, :len(boxes)], s[0, :len(scores)], c[0, :len(classes)] = boxes, scores, classes
    return {"boxes": b, "scores": s, "classes": c}


def test_map_known_answers() -> None:
    labels = [{"boxes": [[10, 10, 30, 40], [50, 50, 70, 70]], "classes": [3, 7]}]
    perfect = coco_map(_padded([[10, 10, 30, 40], [50, 50, 70, 70]], [0.9, 0.8], [3, 7]), labels)
    assert perfect["map"] == pytest.approx(100.0) and perfect["map50"] == pytest.approx(100.0)
    # the class-7 box shifted by 8 px: IoU (12 x 20) / (2 * 400 - 240) = 0.43 -> a miss at every threshold
    shifted = coco_map(_padded([[10, 10, 30, 40], [58, 50, 78, 70]], [0.9, 0.8], [3, 7]), labels)
    assert shifted["map50"] == pytest.approx(50.0) and shifted["map"] == pytest.approx(50.0)
    # the right box under the wrong class finds nothing
    assert coco_map(_padded([[10, 10, 30, 40]], [0.9], [4]), labels)["map50"] == 0.0
    assert coco_map(_padded([], [], []), labels) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_decode_finds_the_planted_peak_and_its_box() -> None:
    g = detector.CANVAS // STRIDE
    heat = np.full((1, 10, g, g), -10.0, np.float32)
    heat[0, 4, 5, 2] = 3.0          # class 4, row 5, column 2
    heat[0, 4, 5, 3] = 1.0          # a neighbour below the peak: suppressed by the 3x3 maximum
    box = np.zeros((1, 4, g, g), np.float32)
    box[0, :, 5, 2] = (0.5, 0.25, 1.5, 2.0)  # offsets in cells, size in 16-pixel units
    out = decode(heat, box, top_k=3)
    assert out["classes"][0, 0] == 4 and out["scores"][0, 0] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-5)
    cx, cy = (2 + 0.5) * STRIDE, (5 + 0.25) * STRIDE
    np.testing.assert_allclose(out["boxes"][0, 0], [cx - 12, cy - 16, cx + 12, cy + 16], atol=1e-4)
    assert (out["scores"][0, 1:] == 0).all()  # everything else is below MIN_SCORE: padding


def test_canvases_use_disjoint_digits_and_tight_boxes() -> None:
    pools = [set(range(*detector.DIGIT_POOLS[s])) for s in ("train", "calibration", "evaluation")]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
    x, labels = detector.calibration_split()
    assert x.shape == (detector.CANVASES["calibration"], 1, 96, 96) and len(labels) == len(x)
    raw = x[:, 0] * detector.STD + detector.MEAN  # back to 0..1
    for img, sample in zip(raw[:20], labels[:20]):
        assert 1 <= len(sample["classes"]) <= 4
        for x1, y1, x2, y2 in sample["boxes"]:
            inside = img[int(y1):int(y2), int(x1):int(x2)]
            assert inside.max() > 0.5 and 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


@pytest.mark.slow
def test_trained_detector_fp32_map() -> None:
    scores = detector.evaluate(detector.pretrained_model())  # trains once (~1 min), then cached
    assert scores["map50"] >= 85.0 and scores["map"] >= 50.0, scores
