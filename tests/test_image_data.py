"""Images as users write them: preprocessing, folder labels, limit, spec errors and sanity warnings.

Known answers are computed by hand from synthetic images (nearest-neighbour interpolation keeps
pixel values exact), so a crop taken from the wrong corner or a channel left unswapped fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibration.data import CalibrationSet, FolderLabels, ImagePreprocess, pick_subset
from calibration.errors import CalibrationDataError
from pipeline.errors import SpecError
from pipeline.spec import check_spec_for_target, load_spec, load_target

ROOT = Path(__file__).resolve().parent.parent
EDGESHIP = Path(sys.executable).with_name("edgeship")


def _image(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr.astype(np.uint8))


def _base(h: int, w: int) -> np.ndarray:
    """(h, w, 3) with every pixel distinct: R = row, G = column, B = 100 + row * w + column."""
    r, c = np.mgrid[0:h, 0:w]
    return np.stack([r * 10, c * 10, 100 + r * w + c], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- preprocessing known answers
def test_resize_shorter_then_center_crop_by_hand() -> None:
    base = _base(4, 6)  # h 4, w 6
    doubled = base.repeat(2, axis=0).repeat(2, axis=1)  # 8 x 12: nearest back to 4 x 6 is exact
    pre = ImagePreprocess(2, 3, resize_shorter=4, center_crop=(2, 3), interpolation="nearest", layout="NHWC",
                          scale=1.0)
    got = pre.pixels(_image(doubled))
    # shorter side 8 -> 4 (the image becomes 4 x 6), crop offsets left (6 - 3) // 2 = 1, top (4 - 2) // 2 = 1
    # (rounding 1.5 up instead would start at column 2, as torchvision's CenterCrop does)
    np.testing.assert_array_equal(got, base[1:3, 1:4])
    np.testing.assert_array_equal(pre(_image(doubled)), base[1:3, 1:4].astype(np.float32))


def test_plain_resize_keeps_its_meaning_and_crop_without_resize() -> None:
    base = _base(4, 6)
    stretched = ImagePreprocess(2, 3, resize=(2, 3), interpolation="nearest").pixels(_image(base))
    np.testing.assert_array_equal(stretched, base[1::2, 1::2])  # aspect not kept: every other pixel
    crop = ImagePreprocess(2, 4, center_crop=(2, 4)).pixels(_image(base))
    np.testing.assert_array_equal(crop, base[1:3, 1:5])


def test_bgr_swaps_channels_and_mean_std_are_per_channel() -> None:
    base = _base(3, 3)
    rgb = ImagePreprocess(3, 3, scale=1.0, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))(_image(base))
    bgr = ImagePreprocess(3, 3, color="bgr", scale=1.0, mean=(30.0, 20.0, 10.0), std=(5.0, 4.0, 2.0))(_image(base))
    assert rgb.shape == (3, 3, 3)  # NCHW: channels first
    np.testing.assert_allclose(rgb[0], (base[..., 0] - 10.0) / 2.0)
    np.testing.assert_allclose(rgb[2], (base[..., 2] - 30.0) / 5.0)
    np.testing.assert_allclose(bgr[0], (base[..., 2] - 30.0) / 5.0)  # blue first
    np.testing.assert_allclose(bgr[::-1], rgb)
    gray = ImagePreprocess(3, 3, color="grayscale", layout="NHWC")(_image(base))
    assert gray.shape == (3, 3, 1)


def test_bicubic_differs_from_bilinear_and_bad_settings_are_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = _image(rng.integers(0, 255, (40, 40, 3)))
    lin = ImagePreprocess(7, 7, interpolation="bilinear").pixels(noisy)
    cub = ImagePreprocess(7, 7, interpolation="bicubic").pixels(noisy)
    assert not np.array_equal(lin, cub)
    with pytest.raises(CalibrationDataError, match="center_crop"):
        ImagePreprocess(4, 4, resize_shorter=8)
    with pytest.raises(CalibrationDataError, match="input expects 4x4"):
        ImagePreprocess(4, 4, center_crop=(3, 3))
    with pytest.raises(CalibrationDataError, match="mean has 2 values"):
        ImagePreprocess(4, 4, mean=(0.5, 0.5))


# ---------------------------------------------------------------- labels of an image folder
def _folder(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (6, 6), (len(name) * 20 % 255, i * 30 % 255, 7)).save(root / name / f"{i}.png")
    return root


def test_a_folder_holding_a_subset_of_classes_is_labelled_by_classes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs", {"dog": 2})
    pre = ImagePreprocess(4, 4)
    named = CalibrationSet.from_image_folder(folder, pre, FolderLabels(classes=("cat", "dog", "fox")))
    assert named.labels is not None and named.labels.tolist() == [1, 1]  # not 0: the listing's number
    listed = CalibrationSet.from_image_folder(folder, pre, FolderLabels())
    assert listed.labels is not None and listed.labels.tolist() == [0, 0]
    with pytest.raises(CalibrationDataError, match="'dog'.*not in the 2 names"):
        CalibrationSet.from_image_folder(folder, pre, FolderLabels(classes=("cat", "fox")))


def test_folder_number_include_and_stray_images(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs", {"0007_n01": 1, "0010_n02": 1, "0012_n03": 1})
    pre = ImagePreprocess(4, 4)
    s = CalibrationSet.from_image_folder(folder, pre, FolderLabels(folder_number=True))
    assert s.labels is not None and s.labels.tolist() == [7, 10, 12]
    some = CalibrationSet.from_image_folder(folder, pre, FolderLabels(folder_number=True, include=("???[05]_*",)))
    assert some.ids == ("0010_n02/0.png",) and some.labels.tolist() == [10]
    (folder / "misc").mkdir()
    with pytest.raises(CalibrationDataError, match="'misc' .*does not start with its class number"):
        CalibrationSet.from_image_folder(folder, pre, FolderLabels(folder_number=True))
    from PIL import Image

    Image.new("RGB", (6, 6)).save(folder / "loose.png")
    with pytest.raises(CalibrationDataError, match="'loose.png' lies directly in"):
        CalibrationSet.from_image_folder(folder, pre, FolderLabels(folder_number=True, include=("0*",)))


def test_limit_takes_a_seeded_class_stratified_subset(tmp_path: Path) -> None:
    labels = np.repeat([0, 1, 2], 5)
    pick = pick_subset(labels, 15, 6)
    assert np.bincount(labels[pick]).tolist() == [2, 2, 2]  # the first 6 would be classes 0 and 1 only
    assert pick.tolist() == pick_subset(labels, 15, 6).tolist() and pick.tolist() == sorted(pick.tolist())
    assert len(set(labels[pick_subset(labels, 15, 2)])) == 2
    folder = _folder(tmp_path / "imgs", {"a": 4, "b": 4, "c": 4})
    s = CalibrationSet.from_image_folder(folder, ImagePreprocess(4, 4), FolderLabels(), limit=3)
    assert sorted(s.labels.tolist()) == [0, 1, 2]


# ---------------------------------------------------------------- spec fields and errors
def _spec(tmp_path: Path, **over) -> Path:
    data = {
        "name": "imgs", "model": {"factory": "mymodel:build"},
        "input": {"name": "input", "shape": [1, 3, 8, 8]},
        "calibration": {"source": {"kind": "images", "path": "cal"}},
        "evaluation": {"source": {"kind": "images", "path": "ev"}, "metric": "top1"},
    }
    for dotted, value in over.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    for name in ("cal", "ev"):
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("field,value,words", [
    ("preprocessing__center_crop", [7, 7], "center_crop gives 7x7 images, input.shape expects 8x8"),
    ("preprocessing__resize_shorter", 10, "add center_crop"),
    ("preprocessing__mean", [0.1, 0.2], "mean has 2 values"),
    ("preprocessing__color", "grayscale", "1 channel(s), input.shape has 3"),
    ("preprocessing__interpolation", "lanczos", "bilinear"),
    ("calibration__source__labels", "folder-name", "folder-number"),
    ("calibration__source__classes", ["a", "a"], "'a' twice"),
])
def test_image_spec_mistakes_name_the_field(tmp_path: Path, field: str, value, words: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(_spec(tmp_path, **{field: value}))
    assert words in str(err.value) and "Value error" not in str(err.value), str(err.value)


def test_every_error_of_a_spec_is_listed(tmp_path: Path) -> None:
    path = _spec(tmp_path, model={"checkpoint": "w.pt"}, input__shape="abc", calibration__method="magic",
                 preprocessing__colour="rgb")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "\n" not in msg and "more)" not in msg and "Value error" not in msg
    assert msg.startswith(f"{path}: 4 errors: ")
    for field in ("'model'", "'input.shape'", "'calibration.method'", "'preprocessing.colour'"):
        assert f"field {field}" in msg, msg
    assert "'checkpoint' needs 'factory' beside it" in msg
    both = _spec(tmp_path, calibration__source={"kind": "images", "path": "cal", "classes_file": "no.txt"},
                 evaluation__source={"kind": "images", "path": "nowhere"})
    with pytest.raises(SpecError, match="classes_file.*'no.txt' not found; field 'evaluation.source.path'"):
        load_spec(both)


def test_onnx_input_with_a_pytorch_only_backend_is_refused_before_building(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"not even read: the pair is refused first")
    spec = load_spec(_spec(tmp_path, model={"onnx": "m.onnx"}))
    with pytest.raises(SpecError, match="'model.onnx': backend 'tflite' of target local"):
        check_spec_for_target(spec, load_target("local"))
    target = load_target("local").model_copy(update={"builds": load_target("local").builds[:1]})
    assert target.builds[0].backend == "onnxruntime"
    check_spec_for_target(spec, target)  # no tflite: fine
    proc = subprocess.run([str(EDGESHIP), "build", "--spec", str(tmp_path / "spec.yaml"), "--target", "local"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("edgeship: error:") == 1, proc.stderr
    assert "tflite" in proc.stderr and "load calibration set" not in proc.stdout  # nothing built


def test_registry_knows_which_backends_convert_from_pytorch() -> None:
    from pipeline.registry import BACKENDS, NEEDS_PYTORCH

    for name in BACKENDS:
        source = "".join(p.read_text() for p in (ROOT / "pipeline" / "backends" / name).rglob("*.py"))
        assert ("torch_model()" in source) == (name in NEEDS_PYTORCH), name


# ---------------------------------------------------------------- modules beside the spec
def test_a_module_beside_the_spec_is_importable(tmp_path: Path) -> None:
    from pipeline.stages.inputs import import_callable, model_loader

    (tmp_path / "mymodel_beside.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    spec = load_spec(_spec(tmp_path, model={"factory": "mymodel_beside:build"}))
    assert type(model_loader(spec)()).__name__ == "Linear"
    (tmp_path / "json.py").write_text("def dumps():\n    return 'mine'\n")
    with pytest.raises(SpecError, match="'json' beside the spec .*rename your file"):
        import_callable("json:dumps", "spec.yaml: field 'model.factory'", tmp_path)


# ---------------------------------------------------------------- sanity warnings
def _samples(n: int, labels: np.ndarray | None):
    from pipeline.backends.base import Samples

    return Samples({"input": np.zeros((n, 3, 8, 8), np.float32)}, labels, [f"s{i}" for i in range(n)], "x")


def test_warnings_chance_listing_and_small_holdout(tmp_path: Path) -> None:
    from pipeline.stages.inputs import data_warnings

    _folder(tmp_path / "ev", {"dog": 3})
    spec = load_spec(_spec(tmp_path))
    target = load_target("local")  # builds int8
    reference = np.zeros((3, 10), np.float32)
    reference[:, 0] = 1.0  # every sample predicted class 0
    calib = _samples(20, np.zeros(20, np.int64))
    notes = data_warnings(spec, target, reference, {"calibration": calib, "evaluation": _samples(3, np.zeros(3, np.int64))})
    assert any("1 class folders are numbered 0..0" in n and "10 outputs" in n for n in notes), notes
    assert any("holds out 4 of 20" in n and "at least 100 held-out samples (500 calibration" in n for n in notes)
    assert not any("chance" in n for n in notes)  # 100 % right
    wrong = data_warnings(spec, target, reference, {"evaluation": _samples(3, np.ones(3, np.int64))})
    assert any("at or below chance (10.00% for 10 classes)" in n for n in wrong), wrong
    fp32_only = load_target("local").model_copy(update={"builds": load_target("local").builds[:1]})
    fp32_only.builds[0] = fp32_only.builds[0].model_copy(update={"precisions": ["fp32"]})
    assert not any("holds out" in n for n in data_warnings(spec, fp32_only, reference, {"calibration": calib}))


# ---------------------------------------------------------------- the example spec
def test_imagenet_images_example_reads_the_workload_s_exact_samples() -> None:
    """examples/imagenet_images.yaml gives the python workload's arrays, so its fp32 top-1 is 86.5 %."""
    from pipeline.stages.inputs import check_disjoint, load_samples
    from pipeline.workloads import effnet

    spec = load_spec(ROOT / "examples" / "imagenet_images.yaml")
    ev, cal = load_samples(spec, "evaluation"), load_samples(spec, "calibration")
    x, y = effnet.evaluation_split()
    xc, yc = effnet.calibration_split()
    assert np.array_equal(ev.x["input"], x) and np.array_equal(ev.y, y) and len(ev.ids) == 400
    assert np.array_equal(cal.x["input"], xc) and np.array_equal(cal.y, yc) and len(cal.ids) == 200
    check_disjoint(cal, ev, spec)
    assert json.dumps(spec.calibration.source.include) == '["???[05]_*"]'


def test_the_imagenet_examples_read_their_workloads_exact_evaluation_samples() -> None:
    """EfficientNet-Lite0's and MobileNetV2's examples read the evaluation split as an image folder
    (so releases ship uint8 pixels): the same float32 bits and labels as the python workloads."""
    from pipeline.stages.inputs import load_samples
    from pipeline.workloads import effnet, mobilenet_v2

    for example, workload in (("efficientnet_lite0.yaml", effnet), ("mobilenet_v2.yaml", mobilenet_v2)):
        spec = load_spec(ROOT / "examples" / example)
        assert spec.evaluation.source.kind == "images", example
        ev = load_samples(spec, "evaluation")
        x, y = workload.evaluation_split()
        assert np.array_equal(ev.x["input"], x) and np.array_equal(ev.y, y) and len(ev.ids) == 400, example
