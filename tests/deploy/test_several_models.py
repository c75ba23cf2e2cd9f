"""One device, several models; ship what passed (issue 16), through the real console script on the
``local`` device: per-spec releases and rollback, the gate outcome kept on the device, rollback's
warning, validate refusing another spec's release, ``recommended``, ``--keep-passing`` and
``--require all``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.cli import MNIST, edgeship, env_for, last_line, local_target

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def _spec(folder: Path, name: str, runs: int, **extra: Any) -> Path:
    """The MNIST example under another name; ``runs`` changes the release id (the agent's config)."""
    data = yaml.safe_load(MNIST.read_text())
    data.update(name=name, validation={"warmup": 1, "runs": runs})
    data.update(extra)
    path = folder / f"{name}-{runs}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _current(device: Path, spec: str) -> str | None:
    link = device / spec / "current"
    return os.readlink(link).split("/")[-1] if os.path.lexists(link) else None


def _deploy(spec: Path, target: Path, out: Path, env: dict[str, str], *flags: str) -> tuple[int, dict[str, Any], str]:
    res = edgeship(["deploy", "--spec", str(spec), "--target", str(target), "--out", str(out),
                    "--json", str(out / "r.json"), *flags], env)
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads((out / "r.json").read_text()) if (out / "r.json").exists() else {}
    return res.returncode, doc, res.stdout + res.stderr


def test_models_keep_their_own_releases_rollback_and_validate(tmp_path: Path) -> None:
    env = env_for(tmp_path, tmp_path / "stages")
    device = tmp_path / "device"
    ok = local_target(tmp_path, device)
    strict = local_target(tmp_path, device, name="strictdev", limits={"max_latency_p90_ms": 0.00001})
    a, b1, b2, c = (_spec(tmp_path, "model-a", 5), _spec(tmp_path, "model-b", 5), _spec(tmp_path, "model-b", 6),
                    _spec(tmp_path, "model-c", 5))

    rc, ra, _ = _deploy(a, ok, tmp_path / "a", env)
    assert rc == 0
    rc, rb1, _ = _deploy(b1, ok, tmp_path / "b1", env)
    assert rc == 0
    assert _current(device, "model-a") == ra["release_id"]  # B did not replace A
    assert _current(device, "model-b") == rb1["release_id"]

    # A failed B goes back to the previous good B, never to A.
    rc, rb2, text = _deploy(b2, strict, tmp_path / "b2", env)
    assert rc == 3 and rb2["release_id"] != rb1["release_id"]
    assert rb2["devices"][0]["rolled_back_to"] == rb1["release_id"] and rb2["devices"][0]["kept"] is False
    assert _current(device, "model-b") == rb1["release_id"] and _current(device, "model-a") == ra["release_id"]
    # A failed first release of C leaves C with nothing current (there is no good C to go back to).
    rc, rc1, _ = _deploy(c, strict, tmp_path / "c", env)
    assert rc == 3 and rc1["devices"][0]["cleared"] is True
    assert _current(device, "model-c") is None and (device / "model-c" / "releases" / rc1["release_id"]).is_dir()
    assert _current(device, "model-a") == ra["release_id"]

    # devices releases: grouped by spec, with build time and the gate outcome recorded on the device.
    listed = edgeship(["devices", "releases", str(ok)], env)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert out.index("model-a") < out.index("model-b") < out.index("model-c (nothing current)")
    b_block = out[out.index("model-b"):out.index("model-c")]
    assert f"* {rb1['release_id'][:16]}" in b_block and "passed (1/1 runs)" in b_block
    assert f"- {rb2['release_id'][:16]}" in b_block and "FAILED (0/1 runs passed), rolled back" in b_block
    assert "built 20" in b_block and "gate not recorded" not in out
    gates = json.loads((device / "model-b" / "gates.json").read_text())
    assert gates[rb2["release_id"]]["gate"] == "failed" and gates[rb1["release_id"]]["gate"] == "passed"

    # Rollback to a release whose gate failed: refused without --force when nobody can be asked.
    refused = edgeship(["rollback", str(ok), "--spec", "model-b"], env)
    assert refused.returncode == 2, refused.stderr
    line = last_line(refused.stderr)
    assert f"release {rb2['release_id'][:12]} of model-b failed its gate" in line and "--force" in line
    assert len(refused.stderr.strip().splitlines()) == 1 and _current(device, "model-b") == rb1["release_id"]
    forced = edgeship(["rollback", str(ok), "--spec", "model-b", "--force"], env)
    assert forced.returncode == 0, forced.stderr
    assert _current(device, "model-b") == rb2["release_id"] and _current(device, "model-a") == ra["release_id"]

    # validate measures the spec's own current release ...
    val = edgeship(["validate", "--spec", str(a), "--target", str(ok), "--out", str(tmp_path / "va"),
                   "--json", str(tmp_path / "va.json")], env)
    assert val.returncode == 0, val.stderr
    assert json.loads((tmp_path / "va.json").read_text())["devices"][0]["deploy"]["release_id"] == ra["release_id"]
    # ... and refuses one built from another version of the spec (same name, other file).
    edited = tmp_path / "edited" / "model-a-5.yaml"
    edited.parent.mkdir()
    edited.write_text(a.read_text().replace("max_drop_pp: 1.0", "max_drop_pp: 2.0"))
    wrong = edgeship(["validate", "--spec", str(edited), "--target", str(ok), "--out", str(tmp_path / "vw")], env)
    assert wrong.returncode == 2, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert "was built from another version of spec model-a" in wrong.stderr and "deploy this spec first" in wrong.stderr


def test_keep_passing_ships_what_passed_and_require_all_rolls_back(tmp_path: Path) -> None:
    env = env_for(tmp_path, tmp_path / "stages")
    device = tmp_path / "device"
    both = [{"backend": "onnxruntime", "precisions": ["fp32", "int8"]}]
    ok = local_target(tmp_path, device, builds=both)
    # int8 (~33 kB) fits, fp32 (~100 kB) does not: a partial pass.
    small = local_target(tmp_path, device, name="smalldev", builds=both, limits={"max_artifact_mb": 0.06})

    rc, good, text = _deploy(_spec(tmp_path, "mnist-k", 5), ok, tmp_path / "good", env)
    assert rc == 0
    assert good["recommended"]["policy"] == "fastest"  # default: the lowest p90 of the runs that passed
    fastest = min(good["runs"], key=lambda r: r["latency_ms"]["p90"])["id"]
    assert good["recommended"]["run"] == fastest == good["devices"][0]["recommended"]["run"]
    assert f"recommended: {fastest} (fastest: p90" in text

    spec = _spec(tmp_path, "mnist-k", 6, deploy={"recommend": "smallest"})
    rc, strict, text = _deploy(spec, small, tmp_path / "all", env, "--require", "all")
    assert rc == 3 and strict["recommended"]["run"] == "onnxruntime-int8"
    assert strict["devices"][0]["rolled_back_to"] == good["release_id"]
    assert _current(device, "mnist-k") == good["release_id"]

    rc, kept, text = _deploy(spec, small, tmp_path / "keep", env, "--keep-passing")
    assert rc == 3  # a run failed its gate: still exit 3
    assert kept["devices"][0]["kept"] is True and not kept["devices"][0]["rolled_back"]
    assert _current(device, "mnist-k") == kept["release_id"]
    assert kept["recommended"]["run"] == "onnxruntime-int8" and kept["recommended"]["policy"] == "smallest"
    assert "recommended: onnxruntime-int8 (smallest:" in text
    assert [r["gate"]["passed"] for r in kept["runs"]] == [r["precision"] == "int8" for r in kept["runs"]]
    gates = json.loads((device / "mnist-k" / "gates.json").read_text())
    assert gates[kept["release_id"]]["kept"] is True and gates[kept["release_id"]]["recommended"] == "onnxruntime-int8"

    both_flags = edgeship(["deploy", "--spec", str(spec), "--target", str(small), "--keep-passing",
                           "--require", "all"], env)
    assert both_flags.returncode == 2 and "--keep-passing is --require any" in last_line(both_flags.stderr)


@pytest.mark.device
def test_models_keep_their_own_releases_over_ssh_on_sim_x86(sim_workspace: Path, tmp_path: Path) -> None:
    """The same per-spec slots on the emulated x86 device, over real OpenSSH: B beside A, a failed
    B back to the previous B, the listing and the rollback refusal read from the device."""
    import uuid

    env = {**env_for(tmp_path, sim_workspace / "stages"), "COLUMNS": "200"}
    root = f"/tmp/edgeship-slots-{uuid.uuid4().hex[:8]}"  # a root of its own on the shared device
    targets = sim_workspace / "targets"
    base = {"extends": "e2e-sim-x86", "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
            "transport": {"root": root}}
    (targets / "slots-ok.yaml").write_text(yaml.safe_dump({"name": "slots-ok", **base}))
    (targets / "slots-strict.yaml").write_text(yaml.safe_dump({"name": "slots-strict", **base,
                                                               "limits": {"max_latency_p90_ms": 0.00001}}))
    few = {"validation": {"warmup": 1, "runs": 5, "samples": 150}}
    a = _spec(tmp_path, "model-a", 5, **few)
    b1 = _spec(tmp_path, "model-b", 5, **few)
    b2 = _spec(tmp_path, "model-b", 6, validation={"warmup": 1, "runs": 6, "samples": 150})

    rc, ra, _ = _deploy(a, Path("slots-ok"), tmp_path / "a", env)
    assert rc == 0, ra.get("gate")
    rc, rb1, _ = _deploy(b1, Path("slots-ok"), tmp_path / "b1", env)
    assert rc == 0, rb1.get("gate")
    rc, rb2, _ = _deploy(b2, Path("slots-strict"), tmp_path / "b2", env)
    assert rc == 3 and rb2["devices"][0]["rolled_back_to"] == rb1["release_id"]

    listed = edgeship(["devices", "releases", "slots-ok"], env)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    a_block, b_block = out[out.index("model-a"):out.index("model-b")], out[out.index("model-b"):]
    assert f"* {ra['release_id'][:16]}" in a_block and "passed (1/1 runs)" in a_block
    assert f"* {rb1['release_id'][:16]}" in b_block
    assert f"- {rb2['release_id'][:16]}" in b_block and "FAILED (0/1 runs passed), rolled back" in b_block

    refused = edgeship(["rollback", "slots-ok", "--spec", "model-b"], env)
    assert refused.returncode == 2 and "failed its gate" in last_line(refused.stderr)
    val = edgeship(["validate", "--spec", str(a), "--target", "slots-ok", "--out", str(tmp_path / "va"),
                   "--json", str(tmp_path / "va.json")], env)
    assert val.returncode == 0, val.stderr  # the agent ran model-a's own current release
    assert json.loads((tmp_path / "va.json").read_text())["devices"][0]["deploy"]["release_id"] == ra["release_id"]
