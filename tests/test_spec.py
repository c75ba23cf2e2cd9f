"""Specs and targets: bad input gives one line naming the file, the field and what is expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.errors import SpecError
from pipeline.spec import load_spec, load_target, target_schema

ROOT = Path(__file__).resolve().parent.parent
GOOD_SPEC = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
GOOD_TARGET = yaml.safe_load((ROOT / "targets" / "local.yaml").read_text())


def _write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _with(base: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(base))
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()

SPEC_CASES = [
    ("unknown top-level field", "modle", {"factory": "x:y"}, "modle", "unknown field"),
    ("wrong type", "input.shape", "abc", "input.shape", "list"),
    ("negative dim", "input.shape", [1, -1, 28, 28], "input.shape", "positive"),
    ("bad batch mode", "input.batch", "sometimes", "input.batch", "static"),
    ("missing model", "model", _DELETE, "model", "required"),
    ("factory without colon", "model.factory", "pipeline.workloads.mnist.pretrained_model", "model", "module:function"),
    ("unknown calibration method", "calibration.method", "magic", "calibration.method", "entropy"),
    ("equalize not true/false/auto", "calibration.equalize", "yes", "calibration.equalize", "auto"),
    ("adaround not true/false/auto", "calibration.adaround", "yes", "calibration.adaround", "auto"),
    ("sqnr floor not positive", "calibration.min_sqnr_db", 0, "calibration.min_sqnr_db", "(0, 200]"),
    ("sqnr floor of an unknown backend", "calibration.min_sqnr_db", {"default": 25, "tflte": 24},
     "calibration.min_sqnr_db", "unknown backend 'tflte'"),
    ("sqnr floor of a backend not positive", "calibration.min_sqnr_db", {"ncnn": -1},
     "calibration.min_sqnr_db", "ncnn: give dB"),
    ("unknown source kind", "calibration.source", {"kind": "ftp", "path": "x"}, "calibration.source", "kind"),
    ("missing npz file", "evaluation.source", {"kind": "npz", "path": "nope.npz"}, "evaluation.source.path", "not found"),
    ("bad metric", "evaluation.metric", "f1", "evaluation.metric", "top1"),
    ("negative budget", "accuracy.max_drop_pp", -1, "accuracy.max_drop_pp", "greater than or equal"),
    ("tie margin on a labelled metric", "evaluation.tie_margin", 0.02, "evaluation", "metric: fidelity"),
    ("tie margin of 1 or more", "evaluation.tie_margin", 1.5, "evaluation.tie_margin", "less than 1"),
]


@pytest.mark.parametrize("label,field,value,named,expect", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec_gives_one_line(tmp_path, label, field, value, named, expect) -> None:
    path = _write(tmp_path, "spec.yaml", _with(GOOD_SPEC, field, value))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert named in msg
    assert expect.lower() in msg.lower()


@pytest.mark.parametrize("value,word", [(True, "on"), (False, "off"), ("auto", "auto")])
def test_calibration_equalize_reaches_the_calibration_config(tmp_path, value, word) -> None:
    from pipeline.backends.calibrate import equalize_choice

    spec = load_spec(_write(tmp_path, "spec.yaml", _with(GOOD_SPEC, "calibration.equalize", value)))
    assert spec.calibration.equalize == value and equalize_choice(spec.calibration.equalize) == word


@pytest.mark.parametrize("value,word", [(True, "on"), (False, "off"), ("auto", "auto")])
def test_calibration_adaround_reaches_the_calibration_config(tmp_path, value, word) -> None:
    from calibration import CalibrationConfig

    from pipeline.backends.calibrate import equalize_choice

    spec = load_spec(_write(tmp_path, "spec.yaml", _with(GOOD_SPEC, "calibration.adaround", value)))
    assert spec.calibration.adaround == value
    assert CalibrationConfig(adaround=equalize_choice(spec.calibration.adaround)).adaround == word


def test_spec_yaml_syntax_error_names_line(tmp_path) -> None:
    path = _write(tmp_path, "spec.yaml", "name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"spec.yaml:.*line"):
        load_spec(path)


def test_spec_missing_file() -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec("does/not/exist.yaml")


def test_spec_not_a_mapping(tmp_path) -> None:
    with pytest.raises(SpecError, match="mapping"):
        load_spec(_write(tmp_path, "spec.yaml", "- a\n- b\n"))


TARGET_CASES = [
    ("unknown field", "trheads", 4, "trheads", "unknown field"),
    ("bad arch", "arch", "sparc", "arch", "x86_64"),
    ("bad precision", "builds.0.precisions", ["int4"], "builds.0.precisions", "fp32"),
    ("unknown backend", "builds.0.backend", "coreml", "builds.0.backend", "onnxruntime"),
    ("threads zero", "threads", 0, "threads", "greater than or equal"),
    ("secret in target", "transport.password", "hunter2", "transport.password", "secrets do not belong"),
    ("ssh without hosts", "transport", {"kind": "ssh"}, "transport", "hosts"),
    ("bad port", "transport", {"kind": "ssh", "hosts": [{"name": "a", "host": "h", "port": 70000}]},
     "transport.hosts.0.port", "less than"),
    ("no builds", "builds", [], "builds", "at least 1"),
]


@pytest.mark.parametrize("label,field,value,named,expect", TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_bad_target_gives_one_line(tmp_path, label, field, value, named, expect) -> None:
    path = _write(tmp_path, "t.yaml", _with(GOOD_TARGET, field, value))
    with pytest.raises(SpecError) as err:
        load_target(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert named in msg
    assert expect.lower() in msg.lower()


def test_extends_merges_and_overrides(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path))
    _write(tmp_path, "base.yaml", {"arch": "aarch64", "threads": 4, "builds": [{"backend": "onnxruntime"}],
                                   "limits": {"max_accuracy_drop_pp": 1.0, "max_memory_mb": 512}})
    _write(tmp_path, "child.yaml", {"extends": "base", "threads": 2, "limits": {"max_memory_mb": 256}})
    t = load_target("child")
    assert t.name == "child" and t.arch == "aarch64" and t.threads == 2
    assert t.limits.max_memory_mb == 256 and t.limits.max_accuracy_drop_pp == 1.0


def test_extends_cycle_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path))
    _write(tmp_path, "a.yaml", {"extends": "b", "arch": "x86_64", "builds": [{"backend": "onnxruntime"}]})
    _write(tmp_path, "b.yaml", {"extends": "a"})
    with pytest.raises(SpecError) as err:
        load_target("a")
    assert "cycle" in str(err.value) and "extends" in str(err.value) and "\n" not in str(err.value)


def test_extends_unknown_parent(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path))
    _write(tmp_path, "c.yaml", {"extends": "nope", "arch": "x86_64", "builds": [{"backend": "onnxruntime"}]})
    with pytest.raises(SpecError, match=r"c.yaml: field 'extends'.*nope"):
        load_target("c")


@pytest.mark.parametrize("name", ["local", "x86-server", "rpi4", "rpi5", "jetson", "jetson-orin-nano",
                                  "sim-arm64", "sim-x86"])
def test_shipped_targets_are_valid(name) -> None:
    t = load_target(name)
    assert t.name == name and t.builds
    for host in t.transport.hosts:
        assert host.key_file is None or "PRIVATE KEY" not in host.key_file


def test_sim_targets_extend_the_boards_they_imitate() -> None:
    assert load_target("sim-arm64").extends == "rpi4" and load_target("sim-arm64").arch == "aarch64"
    assert load_target("sim-x86").extends == "x86-server" and load_target("sim-x86").arch == "x86_64"


def test_schema_validates_shipped_targets() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = target_schema()
    for p in (ROOT / "targets").glob("*.yaml"):
        data = yaml.safe_load(p.read_text())
        if "extends" in data:
            continue  # partial by design: only the merged target is complete
        jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"arch": "x86_64", "builds": [], "bogus": 1}, schema)


def test_every_registered_backend_has_an_options_schema() -> None:
    from pipeline.registry import BACKENDS as REGISTERED
    from pipeline.spec import BACKEND_OPTIONS, BACKENDS

    assert set(BACKEND_OPTIONS) == set(REGISTERED) == set(BACKENDS)


def test_a_spec_validation_block_overrides_the_target_field_by_field() -> None:
    """The spec's warmup/runs for its model, the emulated device's sample limit and rounds: both
    apply (a spec block used to hide the whole target block, so sim-arm64's limit was ignored)."""
    from pipeline.spec import effective_validation, load_spec, load_target

    spec = load_spec(ROOT / "examples" / "mobilenet_v2.yaml")
    target = load_target("sim-arm64")
    merged = effective_validation(spec, target)
    assert (merged.warmup, merged.runs) == (spec.validation.warmup, spec.validation.runs) == (5, 50)
    assert merged.samples == target.validation.samples == 300
    target.validation.rounds = 2
    assert effective_validation(spec, target).rounds == 2
    spec.validation.rounds = 7                                  # set by the spec: the spec wins
    spec.validation.model_fields_set.add("rounds")
    assert effective_validation(spec, target).rounds == 7


@pytest.mark.parametrize("floor,expect", [
    (24.0, {"onnxruntime": 24.0, "tflite": 24.0}),
    ({"default": 25.0, "onnxruntime": 23.0}, {"onnxruntime": 23.0, "tflite": 25.0, "ncnn": 25.0}),
    ({"ncnn": 26.0}, {"ncnn": 26.0, "onnxruntime": None}),
    (None, {"tflite": None}),
])
def test_fidelity_floor_per_backend(tmp_path, floor, expect) -> None:
    """A per-backend floor reaches each backend's INT8 search (its default, else none)."""
    from types import SimpleNamespace

    from pipeline.backends.calibrate import calibration_config

    spec = load_spec(_write(tmp_path, "spec.yaml", _with(GOOD_SPEC, "calibration.min_sqnr_db", floor)))
    for backend, want in expect.items():
        assert spec.calibration.floor_for(backend) == want
        ctx = SimpleNamespace(spec=spec, build=SimpleNamespace(backend=backend),
                              target=SimpleNamespace(limits=SimpleNamespace(max_accuracy_drop_pp=None)))
        assert calibration_config(ctx).min_sqnr_db == want


@pytest.mark.parametrize("value", [True, False])
def test_close_islands_reaches_the_calibration_config(tmp_path, value) -> None:
    """calibration.close_islands (default on) is what the ONNX Runtime search's builder reads."""
    from types import SimpleNamespace

    from pipeline.backends.calibrate import calibration_config

    assert load_spec(_write(tmp_path, "d.yaml", GOOD_SPEC)).calibration.close_islands is True
    spec = load_spec(_write(tmp_path, "spec.yaml", _with(GOOD_SPEC, "calibration.close_islands", value)))
    ctx = SimpleNamespace(spec=spec, build=SimpleNamespace(backend="onnxruntime"),
                          target=SimpleNamespace(limits=SimpleNamespace(max_accuracy_drop_pp=None)))
    assert calibration_config(ctx).close_islands is value
