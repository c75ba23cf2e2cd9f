"""The Dockerfile builds, and the image runs edgeship for real.

The image is built with the Docker SDK against whatever engine answers (start one with
docker/start-dockerd.sh) and tagged by a hash of its build context, so a second run with nothing
changed reuses it instead of rebuilding (see docker/edgeship_image.py). No engine: skipped,
with the reason. A cold build takes minutes (pip installs the whole [all,dev] stack).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

import pipeline

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
IN_IMAGE_REPO = "/opt/edgeship"  # where the Dockerfile puts the source


def _load_helper():
    # docker/ is not a package (it would shadow the Docker SDK), so load the file by path.
    spec = importlib.util.spec_from_file_location("edgeship_image", REPO / "docker" / "edgeship_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


edgeship_image = _load_helper()


@pytest.fixture(scope="session")
def docker_client():
    client, reason = edgeship_image.engine()
    if client is None:
        pytest.skip(reason)
    return client


@pytest.fixture(scope="session")
def image(docker_client) -> str:
    tag, info = edgeship_image.build_image(docker_client, log=lambda m: print(f"[image] {m}"))
    print(f"[image] {tag} {info}")
    return tag


def _run(client, image: str, args: list[str], timeout: int = 120, **kwargs):
    """Run the image's entrypoint with args; returns (exit code, output, container)."""
    container = client.containers.create(image, args, **kwargs)
    try:
        container.start()
        code = container.wait(timeout=timeout)["StatusCode"]
        return code, container.logs(stdout=True, stderr=True).decode(errors="replace"), container
    except Exception:
        container.remove(force=True)
        raise


def test_image_config_and_contents(docker_client, image):
    attrs = docker_client.images.get(image).attrs
    cfg = attrs["Config"]
    assert cfg["Entrypoint"] == ["edgeship"]
    assert cfg["WorkingDir"] == "/work"
    assert cfg["User"] not in ("", "0", "root")
    assert cfg["Labels"]["org.opencontainers.image.title"] == "edgeship"
    assert cfg["Labels"]["org.opencontainers.image.version"] == pipeline.__version__
    # torch is 2.13.0 (the CPU build when docker/wheels/ holds it, as staged here).
    code, out, c = _run(docker_client, image,
                        ["-c", "import torch, glob, os, sys; "
                               "print(torch.__version__, torch.version.cuda); "
                               "print(len(glob.glob(os.path.expanduser('~/.cache/pip/*'))) + len(glob.glob('/root/.cache/pip/*'))); "
                               "print(len(glob.glob(sys.prefix + '/lib/python3*/site-packages/nvidia*'))); "
                               "print(len(glob.glob('/opt/edgeship/**/*.whl', recursive=True) + glob.glob('/tmp/wheels')))"],
                        entrypoint=["python"], network_disabled=True)
    c.remove(force=True)
    assert code == 0, out
    torch_version, cuda, pip_cache, nvidia, wheels = out.split()[:5]
    assert torch_version.startswith("2.13.0")
    # No pip cache, no CUDA libraries, and the wheels of the build context stayed in the deps stage.
    assert (pip_cache, nvidia, wheels) == ("0", "0", "0"), out
    if any((REPO / "docker" / "wheels").glob("torch-*+cpu-*.whl")):
        assert torch_version.endswith("+cpu") and cuda == "None", out
        # ~2.8 GB: base + the [all,dev] venv (torch CPU, jaxlib, litert, pnnx, ...). A CUDA torch
        # or a leaked wheel would show here first.
        assert attrs["Size"] < 3.3e9, f"image is {attrs['Size'] / 1e9:.2f} GB"


def test_version_matches_package(docker_client, image):
    code, out, c = _run(docker_client, image, ["--version"], network_disabled=True)
    c.remove(force=True)
    assert code == 0, out
    assert pipeline.__version__ in out.split(), out


@pytest.mark.slow
def test_build_mnist_example_inside(docker_client, image, tmp_path):
    """`edgeship build` of the MNIST example, offline, as the image's non-root user."""
    out_dir = "/tmp/out"
    code, out, container = _run(
        docker_client, image,
        ["build", "--spec", f"{IN_IMAGE_REPO}/examples/mnist.yaml", "--target", "local", "--out", out_dir],
        timeout=1500, network_disabled=True,  # nothing may be fetched at run time
    )
    try:
        assert code == 0, out[-4000:]
        stream, _ = container.get_archive(out_dir)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(tmp_path, filter="data")
    finally:
        container.remove(force=True)
    produced = tmp_path / Path(out_dir).name
    manifests = sorted(produced.rglob("manifest.json"))
    listing = sorted(str(p.relative_to(produced)) for p in produced.rglob("*"))
    assert manifests, f"no manifest.json under {out_dir}: {listing}"
    manifest_path = manifests[0]
    manifest = json.loads(manifest_path.read_text())
    release = manifest_path.parent
    # Every file the manifest lists is there, with the sha256 it claims.
    assert manifest.get("files"), manifest
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((release / rel).read_bytes()).hexdigest() == digest, rel
    # And there are real model artifacts, one folder per run.
    assert manifest.get("runs"), manifest
    for run in manifest["runs"]:
        files = [p for p in (release / run["dir"]).rglob("*") if p.is_file()]
        assert files and all(p.stat().st_size > 0 for p in files), (run["id"], listing)
