"""Hostile and careless spec / target files (issue 11: items 2, 7, 11, 12, 13, 14, 15, 16).

Every case builds its file inside the test. The loader must refuse it with one line naming the
file, the field and the fix (SpecError, exit 2 through the console script) before anything is
written; canary files prove that nothing outside the build folder was touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.errors import SpecError
from pipeline.spec import load_spec, load_target

ROOT = Path(__file__).resolve().parents[2]
GOOD_SPEC = yaml.safe_load((ROOT / "examples" / "mnist.yaml").read_text())
GOOD_TARGET = yaml.safe_load((ROOT / "targets" / "local.yaml").read_text())
EDGESHIP = Path(sys.executable).parent / "edgeship"


def _spec(tmp_path: Path, **over) -> Path:
    """The mnist example with some top-level fields replaced, written where its paths still resolve."""
    data = json.loads(json.dumps(GOOD_SPEC)) | over
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _target(tmp_path: Path, file: str = "t.yaml", **over) -> Path:
    data = json.loads(json.dumps(GOOD_TARGET)) | over
    p = tmp_path / file
    p.write_text(yaml.safe_dump(data))
    return p


def _refused(fn, *args) -> str:
    with pytest.raises(SpecError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EDGESHIP_TARGETS_PATH"}
    return subprocess.run([str(EDGESHIP), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def _one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


# --------------------------------------------------------------------------------------------
# #2: names are folder names, never paths; output paths stay under the build folder
# --------------------------------------------------------------------------------------------

BAD_NAMES = ["/tmp/victim", "..", ".", "a/b", "-rf", "x" * 65, "", "a b", "../../etc"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_target_name_must_be_a_safe_folder_name(tmp_path, bad) -> None:
    msg = _refused(load_target, str(_target(tmp_path, name=bad)))
    assert "t.yaml" in msg and "field 'name'" in msg and "letters, digits" in msg


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_spec_name_must_be_a_safe_folder_name(tmp_path, bad) -> None:
    msg = _refused(load_spec, _spec(tmp_path, name=bad))
    assert "spec.yaml" in msg and "field 'name'" in msg and "letters, digits" in msg


def test_host_name_must_be_a_safe_folder_name(tmp_path) -> None:
    transport = {"kind": "ssh", "hosts": [{"name": "../evil", "host": "127.0.0.1"}]}
    msg = _refused(load_target, str(_target(tmp_path, transport=transport)))
    assert "transport.hosts.0.name" in msg


def test_contained_refuses_paths_that_leave_the_root(tmp_path) -> None:
    from pipeline.paths import contained

    root = tmp_path / "build"
    assert contained(root / "mnist" / "local", root, "x") == root / "mnist" / "local"
    for escape in (root / ".." / "elsewhere", root / "a" / ".." / ".." / "b", Path("/etc/passwd"), root):
        with pytest.raises(SpecError, match="outside"):
            contained(escape, root, "spec x.yaml")


def test_cli_out_folder_is_contained_even_for_unvalidated_names() -> None:
    """`_out` checks its result, so a name that bypassed validation cannot pick the folder."""
    from pipeline.cli import _out
    from pipeline.spec import PipelineSpec, TargetSpec

    spec = PipelineSpec.model_construct(name="mnist", source_path=Path("s.yaml"))
    for bad in ("/tmp/victim", "..", "../.."):
        target = TargetSpec.model_construct(name=bad, source_path=Path("t.yaml"))
        with pytest.raises(SpecError, match="outside"):
            _out(None, spec, target)
    good = TargetSpec.model_construct(name="local", source_path=Path("t.yaml"))
    assert _out(None, spec, good) == Path("build") / "mnist" / "local"


def test_nightly_paths_are_contained(tmp_path) -> None:
    from pipeline.nightly import history_file

    assert history_file(tmp_path, "mnist", "local") == tmp_path / "mnist" / "local.jsonl"
    for spec_name, target_name in (("..", "x"), ("/tmp", "x"), ("m", "../../x")):
        with pytest.raises(SpecError, match="outside"):
            history_file(tmp_path, spec_name, target_name)


def test_cli_build_with_absolute_target_name_touches_nothing(tmp_path) -> None:
    victim = tmp_path / "victim"
    (victim / "release").mkdir(parents=True)
    canary = victim / "release" / "keep.txt"
    canary.write_text("precious")
    (victim / "results.json").write_text("{}")
    target = _target(tmp_path, name=str(victim))
    proc = _cli("build", "--spec", str(ROOT / "examples" / "mnist.yaml"), "--target", str(target), cwd=tmp_path)
    _one_error_line(proc, "t.yaml", "field 'name'", "letters, digits")
    assert canary.read_text() == "precious" and (victim / "results.json").read_text() == "{}"
    assert sorted(p.name for p in victim.iterdir()) == ["release", "results.json"]
    assert not (tmp_path / "build").exists()


# --------------------------------------------------------------------------------------------
# #11: backend options have a schema; no credentials in URLs; nothing secret reaches a manifest
# --------------------------------------------------------------------------------------------

def _with_build(tmp_path: Path, backend: str, options: dict) -> Path:
    return _target(tmp_path, builds=[{"backend": backend, "precisions": ["fp32"], "options": options}])


def test_secret_in_build_options_is_refused(tmp_path) -> None:
    msg = _refused(load_target, str(_with_build(tmp_path, "onnxruntime", {"password": "s3cr3t"})))
    assert "builds.0.options.password" in msg and "secrets do not belong" in msg
    assert "s3cr3t" not in msg


def test_unknown_build_option_lists_the_allowed_ones(tmp_path) -> None:
    msg = _refused(load_target, str(_with_build(tmp_path, "tensorrt", {"workspce_mb": 512})))
    assert "builds.0.options.workspce_mb" in msg
    assert "workspace_mb, dla_core, profile" in msg


@pytest.mark.parametrize("backend,options", [
    ("tensorrt", {"workspace_mb": 1024, "dla_core": 0, "profile": {"min": 1, "opt": 4, "max": 8}}),
    ("onnxruntime", {"optimize_on_device": True}),
    ("tflite", {"int8_io": True, "channels_last_io": False, "observer": "histogram", "float_layers": ["4"]}),
    ("ncnn", {"float_layers": ["conv_1"]}),
])
def test_the_options_backends_read_are_accepted(tmp_path, backend, options) -> None:
    t = load_target(str(_with_build(tmp_path, backend, options)))
    assert t.builds[0].options == options


@pytest.mark.parametrize("backend,options,named", [
    ("tensorrt", {"workspace_mb": -1}, "builds.0.options.workspace_mb"),
    ("tensorrt", {"profile": {"min": 8, "opt": 4, "max": 16}}, "builds.0.options.profile"),
    ("tensorrt", {"profile": {"min": 1, "opt": 2}}, "builds.0.options.profile.max"),
    ("onnxruntime", {"optimize_on_device": "sometimes"}, "builds.0.options.optimize_on_device"),
    ("tflite", {"observer": "magic"}, "builds.0.options.observer"),
    ("ncnn", {"float_layers": "conv_1"}, "builds.0.options.float_layers"),
])
def test_bad_option_values_name_the_option(tmp_path, backend, options, named) -> None:
    msg = _refused(load_target, str(_with_build(tmp_path, backend, options)))
    assert named in msg and "t.yaml" in msg


@pytest.mark.parametrize("url", ["https://user:s3cr3t@pypi.example/simple", "https://s3cr3t@pypi.example/simple",
                                 "http://user:s3cr3t@10.0.0.1:8080/"])
def test_credentials_in_index_url_are_refused(tmp_path, url) -> None:
    msg = _refused(load_target, str(_target(tmp_path, runtime={"index_url": url})))
    assert "runtime.index_url" in msg and "netrc" in msg and "s3cr3t" not in msg


def test_a_plain_index_url_is_accepted(tmp_path) -> None:
    url = "https://pypi.example/simple"
    assert load_target(str(_target(tmp_path, runtime={"index_url": url}))).runtime.index_url == url


def test_cli_secrets_never_reach_a_manifest(tmp_path) -> None:
    """Refused before the build starts: the previous release's manifest stays, and nothing holds the secret."""
    out = tmp_path / "out"
    (out / "release").mkdir(parents=True)
    manifest = out / "release" / "manifest.json"
    manifest.write_text('{"release_id": "previous"}\n')
    spec = str(ROOT / "examples" / "mnist.yaml")
    for over in ({"runtime": {"index_url": "https://user:s3cr3t@pypi.example/simple"}},
                 {"builds": [{"backend": "onnxruntime", "options": {"token": "s3cr3t"}}]}):
        target = _target(tmp_path, **over)
        proc = _cli("build", "--spec", spec, "--target", str(target), "--out", str(out), cwd=tmp_path)
        line = _one_error_line(proc, "t.yaml")
        assert "s3cr3t" not in line
    assert manifest.read_text() == '{"release_id": "previous"}\n'
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".yaml"
                and "s3cr3t" in p.read_text(errors="replace")]


# --------------------------------------------------------------------------------------------
# #13: package names and versions cannot become pip options
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,version,named", [
    ("-e", "1.0", "runtime.packages"),
    ("--index-url=http://evil", "1.0", "runtime.packages"),
    ("-r", "/etc/passwd", "runtime.packages"),
    ("numpy", "1.26.4 --pre", "runtime.packages.numpy"),
    ("numpy", "-e", "runtime.packages.numpy"),
    ("numpy;os_name=='nt'", "1.0", "runtime.packages"),
])
def test_package_names_and_versions_are_validated(tmp_path, name, version, named) -> None:
    msg = _refused(load_target, str(_target(tmp_path, runtime={"packages": {name: version}})))
    assert named in msg and "t.yaml" in msg


def test_pip_command_ends_options_before_the_pins() -> None:
    """provision() puts `--` before the pins, so no name can be read as an option (recorded command only)."""
    from types import SimpleNamespace

    from pipeline.errors import DeviceError
    from pipeline.spec import TargetSpec
    from pipeline.transport import device

    target = TargetSpec.model_validate({**GOOD_TARGET, "transport": {"kind": "local", "python": "/opt/v/bin/python"},
                                        "runtime": {"packages": {"numpy": "1.26.4"}}})
    commands: list[str] = []

    def run(cmd: str, timeout: float) -> SimpleNamespace:
        commands.append(cmd)
        return SimpleNamespace(rc=0, tail=lambda: "")

    fake = SimpleNamespace(probe=lambda: {"arch": "x86_64", "python": "3.11.0", "packages": {}},
                           executor=SimpleNamespace(name="rec", run=run), host=None)
    with pytest.raises(DeviceError):  # the second probe still shows nothing installed
        device.provision(fake, target)
    pip = [c for c in commands if "pip install" in c]
    assert pip and " -- numpy==1.26.4" in pip[0], commands


# --------------------------------------------------------------------------------------------
# #12: timeouts are finite and bounded
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["connect_timeout_s", "command_timeout_s", "transfer_timeout_s", "keepalive_s"])
@pytest.mark.parametrize("value", [".inf", "1e300", ".nan"])
def test_timeouts_are_finite_and_bounded(tmp_path, field, value) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(GOOD_TARGET).replace("kind: local", f"kind: local\n  {field}: {value}"))
    msg = _refused(load_target, str(path))
    assert f"transport.{field}" in msg


def test_cli_infinite_timeout_is_one_line(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(GOOD_TARGET).replace("kind: local", "kind: local\n  command_timeout_s: .inf"))
    _one_error_line(_cli("targets", "show", str(path), cwd=tmp_path), "t.yaml", "transport.command_timeout_s")


# --------------------------------------------------------------------------------------------
# #7 and #12: alias bombs, nesting, size, non-UTF-8
# --------------------------------------------------------------------------------------------

def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join(f"*a{i - 1}" for _ in range(width))
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _bomb_in(field: str) -> str:
    """A valid target or spec text whose free-form field holds a billion-laughs bomb."""
    bomb = _alias_bomb()
    body = "\n".join("  " + line for line in bomb.splitlines())
    return f"{field}:\n{body}\n"


def test_alias_bomb_in_build_options_is_refused_quickly(tmp_path) -> None:
    text = yaml.safe_dump({k: v for k, v in GOOD_TARGET.items() if k != "builds"})
    text += "builds:\n  - backend: onnxruntime\n    precisions: [fp32]\n    options:\n"
    text += "\n".join("      " + line for line in _alias_bomb().splitlines()) + "\n"
    path = tmp_path / "t.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    msg = _refused(load_target, str(path))
    assert time.perf_counter() - t0 < 5
    assert "t.yaml" in msg and "alias" in msg and "line" in msg


@pytest.mark.parametrize("field", ["export", "model"])
def test_alias_bomb_in_spec_free_form_fields_is_refused(tmp_path, field) -> None:
    data = {k: v for k, v in GOOD_SPEC.items() if k != field}
    text = yaml.safe_dump(data)
    if field == "model":
        text += ("model:\n  factory: pipeline.workloads.mnist:pretrained_model\n  kwargs:\n"
                 + "\n".join("    " + line for line in _alias_bomb().splitlines()) + "\n")
    else:
        text += _bomb_in(field)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    msg = _refused(load_spec, path)
    assert "spec.yaml" in msg and "alias" in msg


def test_a_few_aliases_still_work(tmp_path) -> None:
    text = ("name: t\narch: x86_64\nvalidation: &v {warmup: 1, runs: 5}\n"
            "builds:\n  - &b {backend: onnxruntime, precisions: [fp32]}\n  - *b\n")
    path = tmp_path / "t.yaml"
    path.write_text(text)
    t = load_target(str(path))
    assert len(t.builds) == 2 and t.validation.runs == 5


def test_deep_nesting_is_one_line(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\narch: x86_64\nbuilds: [{backend: onnxruntime}]\nhardware: "
                    + "[" * 5000 + "]" * 5000 + "\n")
    msg = _refused(load_target, str(path))
    assert "t.yaml" in msg and "nest" in msg and "line 4" in msg


def test_oversized_file_is_one_line(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(GOOD_TARGET) + ("# padding\n" * 200_000))
    msg = _refused(load_target, str(path))
    assert "t.yaml" in msg and "MiB" in msg


def test_cli_non_utf8_spec_is_one_line(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"name: caf\xe9\n")
    msg = _refused(load_spec, spec)
    assert "UTF-8" in msg and "spec.yaml" in msg
    _one_error_line(_cli("build", "--spec", str(spec), cwd=tmp_path), "spec.yaml", "UTF-8")


def test_cli_non_utf8_target_is_one_line(tmp_path) -> None:
    target = tmp_path / "t.yaml"
    target.write_bytes(yaml.safe_dump(GOOD_TARGET).encode() + b"description: \xff\xfe\n")
    _one_error_line(_cli("targets", "show", str(target), cwd=tmp_path), "t.yaml", "UTF-8", "line")


# --------------------------------------------------------------------------------------------
# #14: duplicate keys
# --------------------------------------------------------------------------------------------

def test_duplicate_top_level_key_names_key_and_line(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\narch: x86_64\nthreads: 2\nbuilds: [{backend: onnxruntime}]\nthreads: 8\n")
    msg = _refused(load_target, str(path))
    assert "t.yaml" in msg and "duplicate key 'threads'" in msg and "line 5" in msg and "line 3" in msg


def test_duplicate_nested_key_in_spec(tmp_path) -> None:
    text = yaml.safe_dump(GOOD_SPEC).replace("accuracy:\n", "accuracy:\n  max_drop_pp: 9\n", 1)
    assert "max_drop_pp: 9" in text and text.count("max_drop_pp") == 2
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    msg = _refused(load_spec, path)
    assert "duplicate key 'max_drop_pp'" in msg


def test_cli_duplicate_key_is_one_line(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\narch: x86_64\narch: aarch64\nbuilds: [{backend: onnxruntime}]\n")
    _one_error_line(_cli("targets", "show", str(path), cwd=tmp_path), "t.yaml", "duplicate key 'arch'", "line 3")


def test_yaml_merge_keys_may_override(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\narch: x86_64\nbuilds: [{backend: onnxruntime}]\n"
                    "validation: {<<: {warmup: 1, runs: 5}, runs: 7}\n")
    assert load_target(str(path)).validation.runs == 7


# --------------------------------------------------------------------------------------------
# #12: extends chains are capped
# --------------------------------------------------------------------------------------------

def test_long_extends_chain_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path))
    (tmp_path / "t0.yaml").write_text(yaml.safe_dump({"arch": "x86_64", "builds": [{"backend": "onnxruntime"}]}))
    for i in range(1, 3000):
        (tmp_path / f"t{i}.yaml").write_text(f"extends: t{i - 1}\n")
    msg = _refused(load_target, "t2999")
    assert "t2999.yaml" in msg and "extends" in msg and "chain" in msg


def test_a_short_extends_chain_still_works(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESHIP_TARGETS_PATH", str(tmp_path))
    (tmp_path / "t0.yaml").write_text(yaml.safe_dump({"arch": "x86_64", "builds": [{"backend": "onnxruntime"}]}))
    for i in range(1, 8):
        (tmp_path / f"t{i}.yaml").write_text(f"extends: t{i - 1}\nthreads: {i}\n")
    t = load_target("t7")
    assert t.name == "t7" and t.threads == 7 and t.extends == "t6"


# --------------------------------------------------------------------------------------------
# #15: relative extends resolve from the file that says them
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["../base/base.yaml", "./../base/base.yaml", "sibling.yaml"])
def test_relative_extends_resolves_from_the_target_file(tmp_path, monkeypatch, ref) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "boards").mkdir()
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)  # ../base from here is not tmp_path/base
    base = {"arch": "aarch64", "threads": 3, "builds": [{"backend": "onnxruntime"}]}
    (tmp_path / "base" / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "boards" / "sibling.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "boards" / "child.yaml").write_text(f"extends: {ref}\nthreads: 5\n")
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    t = load_target(str(tmp_path / "boards" / "child.yaml"))
    assert t.arch == "aarch64" and t.threads == 5 and t.name == "child"


def test_extends_by_name_still_uses_the_search_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "boards").mkdir()
    (tmp_path / "boards" / "child.yaml").write_text("extends: rpi4\nthreads: 1\n")
    monkeypatch.chdir(tmp_path)
    t = load_target(str(tmp_path / "boards" / "child.yaml"))
    assert t.arch == "aarch64" and t.threads == 1 and t.extends == "rpi4"


def test_missing_relative_parent_names_the_child(tmp_path) -> None:
    (tmp_path / "child.yaml").write_text("extends: ../nope.yaml\n")
    msg = _refused(load_target, str(tmp_path / "child.yaml"))
    assert "child.yaml: field 'extends'" in msg and "nope.yaml" in msg


# --------------------------------------------------------------------------------------------
# #16: a targets/ folder in the working directory says that it is used
# --------------------------------------------------------------------------------------------

def test_shadowing_target_is_announced(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EDGESHIP_TARGETS_PATH", raising=False)
    (tmp_path / "targets").mkdir()
    mine = tmp_path / "targets" / "local.yaml"
    mine.write_text(yaml.safe_dump({**GOOD_TARGET, "threads": 1}))
    monkeypatch.chdir(tmp_path)
    t = load_target("local")
    assert t.threads == 1
    err = capsys.readouterr().err
    assert str(mine) in err and "shadows" in err and str(ROOT / "targets" / "local.yaml") in err


def test_builtin_target_is_quiet(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EDGESHIP_TARGETS_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    load_target("rpi5")
    assert capsys.readouterr().err == ""


def test_cli_targets_show_names_the_shadowing_file(tmp_path) -> None:
    (tmp_path / "targets").mkdir()
    mine = tmp_path / "targets" / "rpi4.yaml"
    mine.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "targets" / "rpi4.yaml").read_text()), "threads": 1}))
    proc = _cli("targets", "show", "rpi5", cwd=tmp_path)  # rpi5 extends the shadowed rpi4
    assert proc.returncode == 0, proc.stderr
    assert str(mine) in proc.stderr and "shadows" in proc.stderr
    assert "threads: 1" in proc.stdout


# --------------------------------------------------------------------------------------------
# The same refusals through the console script: exit 2, one line, no traceback
# --------------------------------------------------------------------------------------------

def _hostile_target(tmp_path: Path, kind: str) -> Path:
    head = "name: t\narch: x86_64\nbuilds: [{backend: onnxruntime}]\n"
    path = tmp_path / "t.yaml"
    if kind == "alias bomb":
        path.write_text(head + "hardware:\n" + "\n".join("  " + line for line in _alias_bomb().splitlines()) + "\n")
    elif kind == "deep nesting":
        path.write_text(head + "hardware: " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "extends chain":
        (tmp_path / "t0.yaml").write_text(head)
        for i in range(1, 3000):
            (tmp_path / f"t{i}.yaml").write_text(f"extends: t{i - 1}.yaml\n")
        path.write_text("extends: t2999.yaml\n")
    return path


@pytest.mark.parametrize("kind,words", [("alias bomb", ("alias",)), ("deep nesting", ("nested", "line 4")),
                                        ("extends chain", ("extends", "chain"))])
def test_cli_hostile_yaml_is_one_line(tmp_path, kind, words) -> None:
    path = _hostile_target(tmp_path, kind)
    t0 = time.perf_counter()
    proc = _cli("targets", "show", str(path), cwd=tmp_path)
    assert time.perf_counter() - t0 < 30
    _one_error_line(proc, "t.yaml", *words)
