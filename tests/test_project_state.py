"""Per-project state (issue 16, "Real boards"), through the console script: the stage cache and the
``local`` device live in ``.edgeship/`` at the git root of the current directory, so two clones
share neither; EDGESHIP_HOME moves both; ``edgeship cache info|clean``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import EDGESHIP, MNIST

pytestmark = [pytest.mark.slow, pytest.mark.backend("onnxruntime")]


def clone(where: Path) -> Path:
    """A fresh git repository holding a target that extends ``local`` without naming a root."""
    where.mkdir()
    subprocess.run(["git", "init", "-q", str(where)], check=True)
    (where / "sub").mkdir()
    (where / "dev.yaml").write_text(yaml.safe_dump({
        "extends": "local", "name": "dev", "builds": [{"backend": "onnxruntime", "precisions": ["fp32"]}],
        "validation": {"warmup": 1, "runs": 5}}))
    return where


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGESHIP_HOME", "EDGESHIP_STAGE_CACHE")}
    return {**env, "COLUMNS": "200", **extra}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGESHIP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def deploy(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # From a subfolder: the state belongs to the repository, not to wherever the command runs.
    return run(["deploy", "--spec", str(MNIST), "--target", str(repo / "dev.yaml"), "--out", str(repo / "out")],
               repo / "sub", env)


def releases(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / ".edgeship" / "devices" / "dev").glob("*/releases/*"))


def entries(repo: Path) -> list[Path]:
    return sorted((repo / ".edgeship" / "stages").glob("*/*/*/.complete"))


def test_two_clones_share_neither_cache_nor_local_device(tmp_path: Path) -> None:
    a, b = clone(tmp_path / "a"), clone(tmp_path / "b")
    env = user_env()
    first = deploy(a, env)
    assert first.returncode == 0, first.stderr
    a_entries, a_releases = entries(a), releases(a)
    assert a_entries and len(a_releases) == 1
    second = deploy(b, env)
    assert second.returncode == 0, second.stderr
    # b built into its own cache and its own device: a's are exactly as they were.
    assert entries(b) and len(releases(b)) == 1
    assert entries(a) == a_entries and releases(a) == a_releases
    assert not (b / "sub" / ".edgeship").exists()

    info = run(["cache", "info"], a / "sub", env)
    assert info.returncode == 0, info.stderr
    assert f"stage cache: {a / '.edgeship' / 'stages'}" in info.stdout
    stages = {ln.split()[0]: int(ln.split()[1]) for ln in info.stdout.splitlines()[1:] if ln.strip()}
    on_disk = {p.parents[2].name for p in a_entries}
    assert set(stages) == on_disk and all(n >= 1 for n in stages.values())

    one = sorted(on_disk)[0]
    assert run(["cache", "clean", "--stage", one], a, env).returncode == 0
    assert {p.parents[2].name for p in entries(a)} == on_disk - {one}
    bad = run(["cache", "clean", "--stage", "no-such-stage"], a, env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert run(["cache", "clean"], a, env).returncode == 0
    assert entries(a) == [] and entries(b)  # the other clone's cache is untouched


def test_edgeship_home_overrides_the_project(tmp_path: Path) -> None:
    repo, home = clone(tmp_path / "repo"), tmp_path / "home"
    env = user_env(EDGESHIP_HOME=str(home))
    info = run(["cache", "info"], repo, env)
    assert info.returncode == 0, info.stderr
    assert f"stage cache: {home / 'stages'}" in info.stdout
    listed = run(["devices", "list", "--json"], repo, env)
    assert listed.returncode == 0, listed.stderr
    local = next(r for r in yaml.safe_load(listed.stdout) if r["target"] == "local")
    assert local["address"] == str(home / "devices" / "local")
    # Without the override the same folder answers with its repository's .edgeship.
    plain = run(["cache", "info"], repo / "sub", user_env())
    assert f"stage cache: {repo / '.edgeship' / 'stages'}" in plain.stdout
