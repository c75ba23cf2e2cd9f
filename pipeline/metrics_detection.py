"""COCO-style detection mAP through pycocotools (the reference implementation, not our own).

Inputs follow shared/decisions.md: per-sample labels ``{"boxes": [[x1, y1, x2, y2], ...] (pixels),
"classes": [int, ...]}`` and padded predictions ``boxes`` (N, K, 4) xyxy pixels, ``scores``
(N, K) (0 = padding) and ``classes`` (N, K). Values are percent (mAP x 100).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)]


def _ground_truth(labels: Sequence[dict[str, Any]], classes: list[int]) -> dict[str, Any]:
    images, annotations = [], []
    for i, sample in enumerate(labels):
        images.append({"id": i})
        for box, cls in zip(sample["boxes"], sample["classes"]):
            xywh = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cls),
                                "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": c} for c in classes]}


def _detections(pred: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    out = []
    boxes, scores, classes = (np.asarray(pred[k]) for k in ("boxes", "scores", "classes"))
    for i, j in zip(*np.nonzero(scores > 0)):
        out.append({"image_id": int(i), "category_id": int(classes[i, j]), "bbox": _xywh(boxes[i, j]),
                    "score": float(scores[i, j])})
    return out


def coco_map(pred: dict[str, np.ndarray], labels: Sequence[dict[str, Any]]) -> dict[str, float]:
    """{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75} in percent, on every sample given."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = sorted({int(c) for s in labels for c in s["classes"]} | {int(c) for c in np.ravel(pred["classes"])})
    dets = _detections(pred)
    if not dets:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = _ground_truth(labels, classes)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(v)) * 100.0 for v in ev.stats[:3]]  # -1 means "no such objects"
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}
