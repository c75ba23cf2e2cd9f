"""The vendored ImageNet sample (data/imagenet-sample): 600 real labelled images, one per class.

Folders are ``<index>_<wnid>`` with ``index`` the standard ImageNet-1k class index, so labels come
from the folder name, never from the order of the folders present. The split is chosen from the
index (shared/decisions.md): calibration = index % 5 == 0 (200 images), evaluation = index % 5 in
{1, 2} (400 images, 0.25 pp each). Images are resized (shorter side 256, bilinear) and
centre-cropped to 224, the evaluation protocol both reference models were published with; only
the normalisation differs per model, so it is a parameter.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from calibration.data import ImagePreprocess

SIZE = 224
RESIZE = 256
CALIBRATION = frozenset({0})
EVALUATION = frozenset({1, 2})
PREPROCESS = ImagePreprocess(SIZE, SIZE, resize_shorter=RESIZE, center_crop=(SIZE, SIZE), interpolation="bilinear")
# Per-channel (mean, std) in pixel units (0-255), applied as (pixel - mean) / std.
NORMALISATION = {
    # EfficientNet-Lite's weights come from TensorFlow, trained on (pixel - 127) / 128.
    "tf": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    # torchvision's ImageNet convention (MobileNetV2's torchvision weights).
    "torchvision": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}


def sample_dir() -> Path:
    """data/imagenet-sample at the project's top level (vendored with the repository)."""
    return Path(__file__).resolve().parents[2] / "data" / "imagenet-sample"


def class_folders(residues: frozenset[int]) -> list[tuple[int, Path]]:
    """(class index, folder) for every class whose index % 5 is in ``residues``, by index."""
    root = sample_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the ImageNet sample is missing (it ships with the repository)")
    out = []
    for folder in sorted(root.iterdir()):
        head = folder.name.split("_", 1)[0]
        if folder.is_dir() and head.isdigit() and int(head) % 5 in residues:
            out.append((int(head), folder))
    return out


def centre_crop(path: Path) -> np.ndarray:
    """One image -> (224, 224, 3) uint8: shorter side resized to 256 (bilinear), centre crop.

    The same geometry a spec gets from ``preprocessing: {resize_shorter: 256, center_crop: [224, 224]}``
    (examples/imagenet_images.yaml): one implementation, calibration.data.ImagePreprocess.
    """
    from PIL import Image

    with Image.open(path) as img:
        return PREPROCESS.pixels(img)


@lru_cache(maxsize=2)
def pixels(residues: frozenset[int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 224, 224, 3) uint8 crops and (N,) int64 class indices of one split."""
    xs, ys = [], []
    for index, folder in class_folders(residues):
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
            xs.append(centre_crop(image))
            ys.append(index)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def normalise(rgb: np.ndarray, convention: str) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 with the model's normalisation."""
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in NORMALISATION[convention])
    return ((rgb.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std).astype(np.float32)


def split(residues: frozenset[int], convention: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised samples and labels of one split, optionally the first ``limit``."""
    rgb, labels = pixels(residues)
    if limit:
        rgb, labels = rgb[:limit], labels[:limit]
    return normalise(rgb, convention), labels
