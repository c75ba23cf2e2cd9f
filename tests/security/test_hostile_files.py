"""Untrusted model and data files (issue 11): each hostile file is built here, and a canary file
proves that nothing in it ran. Key cases also go through the real console script."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.errors import InputFileError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EDGESHIP = Path(sys.executable).parent / "edgeship"
SHAPE = (2, 1, 28, 28)


class Payload:
    """Unpickling this writes the canary file: what a hostile pickle would do instead."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.canary!r}, 'w').write('ran')",))


def _canary_code(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').write('ran')"


def _cnn() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 26 * 26, 10)).eval()


def _save_program(path: Path, dynamic: bool = False) -> "torch.nn.Module":
    model = _cnn()
    kw = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=64)},)} if dynamic else {}
    torch.export.save(torch.export.export(model, (torch.randn(*SHAPE),), **kw), str(path))
    return model


@pytest.fixture(scope="module")
def real_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "real.pt2"
    _save_program(path)
    return path


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "dynamic.pt2"
    _save_program(path, dynamic=True)
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a real torch.export.save archive, letting ``edit`` change its members (root-relative)."""
    with zipfile.ZipFile(src) as zf:
        root = zf.namelist()[0].split("/")[0] + "/"
        members = {n[len(root):]: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in members.items():
            zf.writestr(root + rel, data)
    return dst


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_json(members: dict[str, bytes], rel: str, edit: Callable[[dict], None]) -> None:
    obj = json.loads(members[rel])
    edit(obj)
    members[rel] = json.dumps(obj).encode()


# Each doctor turns a real archive into a hostile one whose code writes ``canary``.
def pickled_weight(m: dict[str, bytes], canary: Path) -> None:
    def edit(cfg: dict) -> None:
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        m["data/weights/" + first["path_name"]] = _torch_saved(Payload(canary))

    _edit_json(m, "data/weights/model_weights_config.json", edit)


def pickled_sample_inputs(m: dict[str, bytes], canary: Path) -> None:
    m["data/sample_inputs/model.pt"] = _torch_saved(((Payload(canary),), {}))


def opaque_constant(m: dict[str, bytes], canary: Path) -> None:
    m["data/constants/model_constants_config.json"] = json.dumps({"config": {"c": {
        "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()
    m["data/constants/opaque_obj_0"] = pickle.dumps(Payload(canary))


def guards_code(m: dict[str, bytes], canary: Path) -> None:
    _edit_json(m, "models/model.json", lambda p: p.update(guards_code=[f"{_canary_code(canary)} > 0"]))


def sympy_expr(m: dict[str, bytes], canary: Path) -> None:
    def edit(p: dict) -> None:  # the dynamic batch's symbol, in the graph's sym_int_values
        for value in p["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] += f" + 0*len(str(exec({_canary_code(canary)!r})))"

    _edit_json(m, "models/model.json", edit)


LIVE = [pickled_weight, pickled_sample_inputs, opaque_constant, guards_code]


def _run_unguarded(path: Path) -> None:
    """What edgeship did before: torch.export.load, then build and call the module."""
    code = ("import sys, torch\nep = torch.export.load(sys.argv[1])\n"
            f"ep.module()(torch.randn{SHAPE})\n")
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=300)


@pytest.mark.parametrize("doctor", LIVE + [sympy_expr], ids=lambda d: d.__name__)
def test_hostile_pt2_refused_and_nothing_runs(doctor, real_pt2: Path, dynamic_pt2: Path,
                                              tmp_path: Path) -> None:
    from pipeline.stages.pt2_guard import load_exported_program

    canary = tmp_path / "canary"
    src = dynamic_pt2 if doctor is sympy_expr else real_pt2
    evil = _rewrite(src, tmp_path / "evil.pt2", lambda m: doctor(m, canary))
    with pytest.raises(InputFileError) as err:
        load_exported_program(evil)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not canary.exists(), "the hostile .pt2 ran code"
    # The payload is live: loading it the way edgeship used to does write the canary.
    _run_unguarded(evil)
    assert canary.exists(), "the doctored file is inert; the test would prove nothing"


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update({"data/aotinductor/model/model.so": b"\x7fELF"}), "data/aotinductor/model/model.so"),
    (lambda m: m.update({"serialized_state_dict.pt": b""}), "serialized_state_dict.pt"),
    (lambda m: _edit_json(m, "models/model.json", lambda p: p["graph_module"]["graph"]["nodes"][1].update(
        target="torch.os.system")), "not a registered operator"),
], ids=["aoti-library", "legacy-pickle-member", "python-call-target"])
def test_pt2_members_outside_a_plain_program_refused(edit, words: str, real_pt2: Path, tmp_path: Path) -> None:
    from pipeline.stages.pt2_guard import load_exported_program

    evil = _rewrite(real_pt2, tmp_path / "evil.pt2", edit)
    with pytest.raises(InputFileError, match="refused") as err:
        load_exported_program(evil)
    assert words in str(err.value)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_legitimate_pt2_loads_and_matches(dynamic: bool, tmp_path: Path) -> None:
    from pipeline.stages.pt2_guard import load_exported_program

    path = tmp_path / "model.pt2"
    model = _save_program(path, dynamic)
    x = torch.randn(*SHAPE)
    got = load_exported_program(path).module()(x)
    torch.testing.assert_close(got, model(x))
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the load


# ---------------------------------------------------------------- through the console script
def _write_spec(folder: Path, model: dict, **overrides: object) -> Path:
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.normal(size=(8, *SHAPE[1:])).astype(np.float32))
    np.savez(folder / "eval.npz", x=rng.normal(size=(8, *SHAPE[1:])).astype(np.float32),
             y=np.arange(8) % 10)
    spec = {"name": "hostile", "model": model, "input": {"name": "x", "shape": list(SHAPE)},
            "calibration": {"source": {"kind": "npz", "path": "calib.npz"}},
            "evaluation": {"source": {"kind": "npz", "path": "eval.npz"}, "metric": "top1"}}
    spec.update(overrides)
    path = folder / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def _onnx_target(folder: Path) -> Path:
    """``local`` without tflite: a spec that starts from model.onnx is refused for a backend converting from PyTorch."""
    path = folder / "onnx-local.yaml"
    path.write_text(json.dumps({"extends": "local", "name": "local",
                                "builds": [{"backend": "onnxruntime", "precisions": ["fp32", "int8"]}]}))
    return path


def _edgeship_build(spec: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGESHIP_HOME": str(spec.parent / "home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(EDGESHIP), "build", "--spec", str(spec), "--target", str(_onnx_target(spec.parent))],
                          cwd=spec.parent, env=env, capture_output=True, text=True, timeout=600)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Exit ``code``, no traceback, exactly one error line, naming every one of ``names``."""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgeship: error:")]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr[-2000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("doctor", [pickled_weight, guards_code], ids=lambda d: d.__name__)
def test_cli_refuses_hostile_pt2(doctor, real_pt2: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _rewrite(real_pt2, tmp_path / "evil.pt2", lambda m: doctor(m, canary))
    proc = _edgeship_build(_write_spec(tmp_path, {"exported": "evil.pt2"}))
    assert_one_error_line(proc, 2, "evil.pt2", "model.exported")
    assert not canary.exists()


# ---------------------------------------------------------------- labels outside the classes (#9)
def _onnx_classifier(path: Path, classes: int = 10) -> Path:
    """A real ONNX model: flatten (N, 1, 28, 28) and project to ``classes`` logits."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = np.random.default_rng(1).normal(size=(28 * 28, classes)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SHAPE[0], classes])],
                              [numpy_helper.from_array(w, "W")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _samples(y: np.ndarray | None):
    from pipeline.backends.base import Samples

    return Samples({"x": np.zeros((len(y), 1), np.float32)}, y, [f"eval.npz:{i}" for i in range(len(y))], "")


@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_labels_outside_the_model_classes_refused(bad: int, tmp_path: Path) -> None:
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import check_labels

    _onnx_classifier(tmp_path / "m.onnx")
    spec = load_spec(_write_spec(tmp_path, {"onnx": "m.onnx"}))
    y = np.arange(8) % 10
    check_labels(spec, np.zeros((8, 10), np.float32), {"evaluation": _samples(y)})  # in range: passes
    y[3] = bad
    with pytest.raises(InputFileError) as err:
        check_labels(spec, np.zeros((8, 10), np.float32), {"evaluation": _samples(y)})
    msg = str(err.value)
    assert f"label {bad} of sample 'eval.npz:3'" in msg and "eval.npz" in msg and "0..9" in msg


@pytest.mark.slow
@pytest.mark.parametrize("labels, words", [
    (np.array([0, 1, 2, -1, 4, 5, 6, 7]), "label -1"),
    (np.array([0, 1, 2, 10, 4, 5, 6, 7]), "label 10"),
    (np.array([0, 1, 2, 0.5, 4, 5, 6, 7]), "integer class indices"),
], ids=["negative", "too-large", "non-integer"])
def test_cli_refuses_labels_outside_the_classes(labels: np.ndarray, words: str, tmp_path: Path) -> None:
    _onnx_classifier(tmp_path / "m.onnx")
    spec = _write_spec(tmp_path, {"onnx": "m.onnx"})
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(2).normal(size=(8, *SHAPE[1:])).astype(np.float32),
             y=labels)
    proc = _edgeship_build(spec)
    assert_one_error_line(proc, 2, "eval.npz", "evaluation.source", words)
    assert not (tmp_path / "build" / "hostile" / "local" / "release").exists()


# ---------------------------------------------------------------- one line instead of tracebacks (#12)
FACTORY_MODULE = '''
import torch


def cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 26 * 26, 10)).eval()


def broken():
    raise RuntimeError("weights server unreachable")


def data_broken():
    raise KeyError("split")
'''


def _user_module(folder: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    """A factory module the spec names (user code, trusted); importable from ``folder``.

    Each test's module has a name of its own: a module of the same name imported from another
    folder earlier in the session would shadow it, and edgeship rightly refuses that."""
    name = "usercode_a11_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    (folder / f"{name}.py").write_text(FACTORY_MODULE)
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(folder))
    return name


def _truncated_onnx(folder: Path) -> Path:
    real = _onnx_classifier(folder / "full.onnx").read_bytes()
    path = folder / "m.onnx"
    path.write_bytes(real[: len(real) // 2])
    return path


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_corrupt_onnx_refused_in_one_line(content: str, tmp_path: Path) -> None:
    from pipeline.stages.onnx_guard import check_onnx_file

    path = _truncated_onnx(tmp_path)
    if content == "garbage":
        path.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(InputFileError) as err:
        check_onnx_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert check_onnx_file(tmp_path / "full.onnx") == []  # the intact model passes


def test_checkpoint_refused_by_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import model_loader

    canary = tmp_path / "canary"
    mod = _user_module(tmp_path, monkeypatch)
    torch.save({"0.weight": Payload(canary)}, tmp_path / "evil.pt")
    spec = load_spec(_write_spec(tmp_path, {"factory": f"{mod}:cnn", "checkpoint": "evil.pt"}))
    with pytest.raises(InputFileError, match="weights_only") as err:
        model_loader(spec)()
    assert "evil.pt" in str(err.value) and "exec" in str(err.value) and "\n" not in str(err.value)
    assert not canary.exists()
    torch.save({"wrong.key": torch.zeros(1)}, tmp_path / "evil.pt")  # loads, but does not fit
    with pytest.raises(InputFileError, match="does not fit"):
        model_loader(spec)()


def _object_npz(folder: Path, canary: Path) -> None:
    np.savez(folder / "eval.npz", x=np.array([Payload(canary)] * 8, dtype=object), y=np.arange(8))


def _huge_npz(folder: Path) -> None:
    """An .npz whose header declares 4 TB of samples; the data itself is a few bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (1_000_000, 1, 1000, 1000)})
    with zipfile.ZipFile(folder / "eval.npz", "w") as zf:
        zf.writestr("x.npy", header.getvalue() + b"\0" * 64)  # magic and header, then 64 bytes


def _png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` grey pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _image_folder(folder: Path, png: bytes) -> None:
    (folder / "imgs" / "cat").mkdir(parents=True)
    (folder / "imgs" / "cat" / "a.png").write_bytes(png)


@pytest.mark.parametrize("case, words", [
    ("object-array", "holds Python objects"),
    ("huge-header", "GiB of memory"),
    ("bomb-error", "decompression bomb"),
    ("bomb-warning", "decompression bomb"),
    ("huge-input-shape", "GiB of memory"),
])
def test_hostile_data_files_refused_in_one_line(case: str, words: str, tmp_path: Path) -> None:
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import load_samples

    canary = tmp_path / "canary"
    spec_path = _write_spec(tmp_path, {"onnx": "m.onnx"})
    data = json.loads(spec_path.read_text())
    if case == "object-array":
        _object_npz(tmp_path, canary)
    elif case == "huge-header":
        _huge_npz(tmp_path)
    else:
        size = {"bomb-error": (100_000, 100_000), "bomb-warning": (10_000, 10_000)}.get(case, (28, 28))
        _image_folder(tmp_path, _png(*size))
        data["evaluation"]["source"] = {"kind": "images", "path": "imgs"}
        data["preprocessing"] = {"color": "grayscale"}  # the input has one channel
        if case == "huge-input-shape":
            data["input"]["shape"] = [1, 3, 100_000, 100_000]
            data["preprocessing"] = {"color": "rgb"}
    spec_path.write_text(json.dumps(data))
    _onnx_classifier(tmp_path / "m.onnx")
    with pytest.raises(InputFileError) as err:
        load_samples(load_spec(spec_path), "evaluation")
    msg = str(err.value)
    assert words in msg and "evaluation.source" in msg and "\n" not in msg, msg
    assert ("eval.npz" if "npz" in msg else "imgs") in msg
    assert not canary.exists()


@pytest.mark.parametrize("field", ["factory", "callable"])
def test_user_code_that_raises_is_one_user_code_error(field: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import UserCodeError
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import load_samples, model_loader

    mod = _user_module(tmp_path, monkeypatch)
    if field == "factory":
        spec = load_spec(_write_spec(tmp_path, {"factory": f"{mod}:broken"}))
        call, names = model_loader(spec), [f"{mod}:broken", "model.factory", "weights server unreachable"]
    else:
        spec = load_spec(_write_spec(tmp_path, {"factory": f"{mod}:cnn"}, evaluation={
            "source": {"kind": "python", "callable": f"{mod}:data_broken"}, "metric": "top1"}))
        call, names = (lambda: load_samples(spec, "evaluation")), [f"{mod}:data_broken", "evaluation.source.callable"]
    with pytest.raises(UserCodeError) as err:
        call()
    assert all(n in str(err.value) for n in names), str(err.value)
    assert UserCodeError.exit_code == 1


def _cli_case(case: str, folder: Path) -> tuple[Path, int, list[str]]:
    """Each key case as a spec on disk: (spec, expected exit code, words the error line names)."""
    mod = _user_module(folder)
    canary = folder / "canary"
    if case == "truncated-onnx":
        _truncated_onnx(folder)
        return _write_spec(folder, {"onnx": "m.onnx"}), 2, ["m.onnx", "model.onnx"]
    if case == "checkpoint-custom-class":
        torch.save({"0.weight": Payload(canary)}, folder / "evil.pt")
        return _write_spec(folder, {"factory": f"{mod}:cnn", "checkpoint": "evil.pt"}), 2, ["evil.pt", "weights_only"]
    if case == "factory-raises":
        return _write_spec(folder, {"factory": f"{mod}:broken"}), 1, [f"{mod}:broken", "RuntimeError"]
    spec = _write_spec(folder, {"factory": f"{mod}:cnn"})
    if case == "npz-object-array":
        _object_npz(folder, canary)
        return spec, 2, ["eval.npz", "Python objects"]
    _image_folder(folder, _png(100_000, 100_000))
    data = json.loads(spec.read_text())
    data["evaluation"]["source"] = {"kind": "images", "path": "imgs"}
    data["preprocessing"] = {"color": "grayscale"}  # the input has one channel
    spec.write_text(json.dumps(data))
    return spec, 2, ["a.png", "decompression bomb"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated-onnx", "checkpoint-custom-class", "factory-raises",
                                  "npz-object-array", "image-bomb"])
def test_cli_hostile_files_one_line(case: str, tmp_path: Path) -> None:
    spec, code, words = _cli_case(case, tmp_path)
    env_path = f"{tmp_path}{os.pathsep}{ROOT}"
    proc = subprocess.run([str(EDGESHIP), "build", "--spec", str(spec), "--target", str(_onnx_target(tmp_path))],
                          cwd=tmp_path,
                          env={**os.environ, "EDGESHIP_HOME": str(tmp_path / "home"), "PYTHONPATH": env_path},
                          capture_output=True, text=True, timeout=600)
    assert_one_error_line(proc, code, *words)
    assert not (tmp_path / "canary").exists()


# ---------------------------------------------------------------- misleading messages (#18)
def test_empty_evaluation_set_names_the_evaluation_source(tmp_path: Path) -> None:
    from pipeline.spec import load_spec
    from pipeline.stages.inputs import load_samples

    _onnx_classifier(tmp_path / "m.onnx")
    spec = load_spec(_write_spec(tmp_path, {"onnx": "m.onnx"}))
    np.savez(tmp_path / "eval.npz", x=np.zeros((0, *SHAPE[1:]), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(InputFileError) as err:
        load_samples(spec, "evaluation")
    msg = str(err.value)
    assert "evaluation.source" in msg and "eval.npz" in msg and "no samples" in msg
    assert "calibration" not in msg.lower()


def test_one_sample_advice_is_accepted_by_the_schema() -> None:
    from calibration.data import CalibrationSet
    from calibration.errors import CalibrationDataError
    from pipeline.spec import CalibrationSpec

    with pytest.raises(CalibrationDataError) as err:
        CalibrationSet(np.zeros((1, 4), np.float32), ("only",)).split(0.2)
    msg = str(err.value)
    assert "None" not in msg and "calibration.source" in msg
    for advice in re.findall(r"(\w+)=(\S+)", msg):  # any key=value it suggests must validate
        CalibrationSpec.model_validate({"source": {"kind": "npz", "path": "x.npz"}, advice[0]: advice[1]})


def test_pt2_metadata_zip_bomb_refused_before_unpacking(real_pt2: Path, tmp_path: Path) -> None:
    from pipeline.stages.pt2_guard import load_exported_program

    evil = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(real_pt2) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        root = src.namelist()[0].split("/")[0]
        with dst.open(f"{root}/extra/notes.txt", "w") as member:  # 300 MiB of spaces, ~300 KB packed
            for _ in range(300):
                member.write(b" " * 2**20)
    assert evil.stat().st_size < 5 * 2**20
    with pytest.raises(InputFileError, match="zip bomb"):
        load_exported_program(evil)
