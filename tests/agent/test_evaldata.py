"""Evaluation data ships as uint8 pixels and is normalised on the device (pipeline.agent.evaldata).

The host's float32 samples (what its fp32 reference ran on) and the device's, decoded from the
release's file by the agent's own code, must be the same bits; the pixels are stored losslessly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.data import CalibrationSet, FolderLabels, ImagePreprocess
from pipeline.agent.evaldata import PixelSamples, normalise, recipe, sub_filter, unfilter, write_pixels
from pipeline.backends.base import Samples
from pipeline.stages.inputs import to_samples
from pipeline.stages.package import eval_arrays, eval_pixels


def _photos(root: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):  # sizes and aspects differ, as a camera folder's do
            h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
            smooth = np.cumsum(rng.integers(-8, 9, (h, w, 3)), axis=1) + 40 * c + 100
            Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


PREPROCESS = [
    ImagePreprocess(16, 16, resize_shorter=18, center_crop=(16, 16), mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225)),
    ImagePreprocess(16, 16, layout="NHWC", color="bgr", scale=1.0, mean=(127.0,), std=(128.0,),
                    interpolation="bicubic"),
    ImagePreprocess(12, 16, color="grayscale", resize=(12, 16), scale=1.0 / 3.0, mean=(0.5,), std=(7.0,)),
]


@pytest.mark.parametrize("prep", PREPROCESS, ids=["nchw-rgb-imagenet", "nhwc-bgr-tf", "grayscale"])
def test_device_normalised_samples_equal_the_host_s_bit_for_bit(tmp_path: Path, prep: ImagePreprocess) -> None:
    """Host: decode + resize + crop + normalise (what the fp32 reference runs on). Device: the
    agent's reader of the release's uint8 file. Same bytes, and the formula the recipe states."""
    host = CalibrationSet.from_image_folder(_photos(tmp_path / "imgs", 1), prep, FolderLabels())
    samples = to_samples(host, "input", prep.recipe())
    files = eval_pixels(samples)
    assert list(files) == ["x"] and files["x"].values.dtype == np.uint8
    assert eval_arrays(samples, {"out": np.zeros((6, 2), np.float32)}, set(files)).keys() == {"reference", "y"}
    write_pixels(tmp_path / "x.npz", files["x"].values, files["x"].recipe["stride"])
    device = PixelSamples(tmp_path / "x.npz", files["x"].recipe)
    assert len(device) == 6 and device.shape == host.samples.shape
    assert device[0:6].tobytes() == host.samples.tobytes()
    assert device[2:5].tobytes() == host.samples[2:5].tobytes() and device[-1].tobytes() == host.samples[-1].tobytes()
    # the lookup table is exactly the arithmetic it stands for, in float32
    pix = host.pixels.astype(np.float32)
    direct = (pix * np.float32(prep.scale) - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    direct = np.moveaxis(direct, -1, -3) if prep.layout == "NCHW" else direct
    assert np.ascontiguousarray(direct).tobytes() == host.samples.tobytes()
    assert host.subset([4, 1]).pixels.tolist() == host.pixels[[4, 1]].tolist()


def test_sub_filter_round_trips_every_byte_and_shrinks_smooth_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)  # wraps around 0 and 255
    for s in noise:
        assert np.array_equal(unfilter(sub_filter(s, 3), 3, s.shape), s)
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (8, 64, 64, 3)), axis=2) + 128, 0, 255).astype(np.uint8)
    write_pixels(tmp_path / "s.npz", smooth, 3)
    np.savez_compressed(tmp_path / "plain.npz", smooth)
    assert (tmp_path / "s.npz").stat().st_size < 0.8 * (tmp_path / "plain.npz").stat().st_size
    back = PixelSamples(tmp_path / "s.npz", recipe(1.0, [0.0], [1.0], "stored", 3))
    assert np.array_equal(back[0:8], smooth.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        write_pixels(tmp_path / "bad.npz", smooth.astype(np.int16), 3)


def test_non_image_inputs_keep_float32_and_whole_uint8_values_ship_as_uint8() -> None:
    """A python/npz source's normalised floats ship as float32, untouched; samples that are
    whole numbers 0..255 ship as uint8 and come back as the same float32 bits."""
    rng = np.random.default_rng(0)
    floats = rng.normal(size=(5, 1, 4, 4)).astype(np.float32)
    counts = rng.integers(0, 256, (5, 1, 4, 4)).astype(np.float32)
    samples = Samples({"a": floats, "b": counts}, np.arange(5), [str(i) for i in range(5)], "h")
    pixels = eval_pixels(samples)
    assert list(pixels) == ["x_1"] and pixels["x_1"].values.dtype == np.uint8
    assert normalise(pixels["x_1"].values, pixels["x_1"].recipe).tobytes() == counts.tobytes()
    arrays = eval_arrays(samples, {"o": floats[:, 0, 0]}, set(pixels))
    assert set(arrays) == {"x", "reference", "y"} and arrays["x"].tobytes() == floats.tobytes()
    assert eval_pixels(Samples({"a": counts + 0.5}, None, list("abcde"), "h")) == {}
    assert eval_pixels(Samples({"a": counts * 2.0}, None, list("abcde"), "h")) == {}  # up to 510
