"""CalibrationSet loaders, hashes, manifests and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.data import CalibrationSet, FolderLabels, ImagePreprocess, check_overlap
from calibration.errors import CalibrationDataError


def test_hash_is_stable_and_content_based() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = CalibrationSet.from_arrays(x)
    b = CalibrationSet.from_arrays(list(x.copy()), ids=["p", "q"])  # other ids, same bytes
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    assert a.ids == ("index:0", "index:1")
    c = CalibrationSet.from_arrays(x[::-1].copy())
    assert c.content_hash != a.content_hash  # order is part of the set
    d = CalibrationSet.from_arrays(x, labels=[0, 1])
    assert d.content_hash != a.content_hash  # labels too


def test_empty_set_is_refused() -> None:
    with pytest.raises(CalibrationDataError, match="empty"):
        CalibrationSet.from_arrays([])


def test_wrong_shape_names_sample_and_shapes() -> None:
    arrays = [np.zeros((3, 8, 8)), np.zeros((3, 8, 8)), np.zeros((3, 8, 7))]
    with pytest.raises(CalibrationDataError, match=r"'index:2'.*\(3, 8, 7\).*expected \(3, 8, 8\)"):
        CalibrationSet.from_arrays(arrays)


def test_nan_sample_is_named() -> None:
    x = np.zeros((3, 2), np.float32)
    x[1, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="'index:1'"):
        CalibrationSet.from_arrays(x)


def test_npz_and_npy_loaders(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(5))
    s = CalibrationSet.from_numpy(tmp_path / "c.npz")
    assert s.labels is not None and s.labels.tolist() == [0, 1, 2, 3, 4]
    assert s.ids[0] == "c.npz:0"
    np.save(tmp_path / "c.npy", x)
    assert np.array_equal(CalibrationSet.from_numpy(tmp_path / "c.npy").samples, x)
    with pytest.raises(CalibrationDataError, match=r"expected \(2, 2\)"):
        CalibrationSet.from_numpy(tmp_path / "c.npy", input_shape=(2, 2))


def test_unreadable_and_keyless_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not numpy at all")
    with pytest.raises(CalibrationDataError, match="broken.npy"):
        CalibrationSet.from_numpy(bad)
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 2)))
    with pytest.raises(CalibrationDataError, match=r"needs key\(s\) \['x'\]"):
        CalibrationSet.from_numpy(tmp_path / "nox.npz")
    with pytest.raises(CalibrationDataError, match="missing.npz"):
        CalibrationSet.from_numpy(tmp_path / "missing.npz")


def test_image_folder_loader_and_errors(tmp_path: Path) -> None:
    from PIL import Image

    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), color).save(tmp_path / cls / f"{i}.png")
    pre = ImagePreprocess(height=4, width=5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    s = CalibrationSet.from_image_folder(tmp_path, pre, labels=FolderLabels())
    assert s.input_shape == (3, 4, 5) and s.ids[0] == "cat/0.png"
    assert s.labels is not None and s.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(s.samples[0, :, 0, 0], [1.0, -1.0, -1.0])  # red, normalized
    gray = CalibrationSet.from_image_folder(tmp_path, ImagePreprocess(4, 5, layout="NHWC", color="grayscale"))
    assert gray.input_shape == (4, 5, 1)
    (tmp_path / "dog" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CalibrationDataError, match="dog/bad.png"):
        CalibrationSet.from_image_folder(tmp_path, pre)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="no images"):
        CalibrationSet.from_image_folder(tmp_path / "empty", pre)


def test_manifest_json(tmp_path: Path) -> None:
    s = CalibrationSet.from_arrays(np.ones((3, 2), np.float32) * np.arange(3)[:, None], labels=[1, 2, 3])
    m = json.loads(s.write_manifest(tmp_path / "m.json").read_text())
    assert m["set_sha256"] == s.content_hash and m["count"] == 3
    assert [e["id"] for e in m["samples"]] == list(s.ids)
    assert m["samples"][2]["sha256"] == s.sample_hashes[2] and m["samples"][2]["label"] == 3


def test_overlap_is_refused_naming_both_ids() -> None:
    rng = np.random.default_rng(0)
    ev = rng.normal(size=(4, 3)).astype(np.float32)
    cal = np.concatenate([rng.normal(size=(3, 3)).astype(np.float32), ev[2:3]])
    calib = CalibrationSet.from_arrays(cal, ids=["a.png", "b.png", "c.png", "leak.png"])
    evals = CalibrationSet.from_arrays(ev, ids=["e0", "e1", "e2", "e3"])
    with pytest.raises(CalibrationDataError, match=r"'leak.png'=='e2'"):
        check_overlap(calib, evals)
    check_overlap(calib.subset([0, 1, 2]), evals)  # disjoint: no error


def test_split_is_seeded_and_disjoint() -> None:
    s = CalibrationSet.from_arrays(np.arange(20, dtype=np.float32).reshape(10, 2))
    fit, hold = s.split(0.3, seed=1)
    assert len(hold) == 3 and len(fit) == 7
    assert not set(fit.ids) & set(hold.ids)
    assert s.split(0.3, seed=1)[1].ids == hold.ids
