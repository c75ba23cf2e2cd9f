"""Stage: package artifacts, the device agent and the evaluation samples into a release folder.

Layout (what a transport ships, verbatim):
    manifest.json            what is in the release, sha256 of every file, provenance
    edgeship_agent/          the device agent (stdlib + numpy + one runtime)
    artifacts/<run-id>/...   one folder per (backend, precision)
    data/x.npy, y.npy, reference.npy   evaluation samples, labels (if any), fp32 outputs
                             (plain .npy: the agent memory-maps them)
    data/x.npz               instead of x.npy for an image source (or samples that are uint8
                             values): uint8 pixels, Sub-filtered and deflated, plus the agent
                             config's ``pixels`` recipe; the device normalises them per batch
                             (pipeline.agent.evaldata), bit-identical to the host's samples
    postprocess/<module>.py  evaluation.postprocess, run by the agent per batch (if the spec has one)

The release id is the sha256 over the file list (names and hashes) and the agent settings, so
an unchanged build gives the same id and a deploy of it moves no bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.agent.evaldata import normalise, recipe, write_pixels
from pipeline.backends.base import Artifact, Pixels, Samples
from pipeline.cache import canonical_json, disk_full, disk_full_error, sha256_file
from pipeline.spec import PipelineSpec, TargetSpec, effective_validation

AGENT_SOURCE = Path(__file__).resolve().parent.parent / "agent"


def run_id(backend: str, precision: str) -> str:
    return f"{backend}-{precision}"


def package_release(out_dir: Path, spec: PipelineSpec, target: TargetSpec, artifacts: list[Artifact],
                    evals: Samples, reference: dict[str, np.ndarray], provenance: dict[str, Any]) -> tuple[Path, str, dict]:
    """Write ``out_dir/release`` atomically; returns (path, release id, manifest).

    The caller holds ``out_dir`` (pipeline.build.locked_out_dir), so any ``.release-*`` folder
    found there was left by a run that was killed, and goes. The new release is written beside
    the old one, so it needs its full size free; a full disk is one line and the old release stays.
    """
    from pipeline.paths import replace_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".release-*"):
        shutil.rmtree(stale, ignore_errors=True)
    pixels = eval_pixels(evals)
    arrays = eval_arrays(evals, reference, set(pixels))
    need = _release_bytes(artifacts, [*arrays.values(), *(p.values for p in pixels.values())])
    if shutil.disk_usage(out_dir).free < need:
        raise disk_full_error(out_dir, "the release", need)
    tmp = Path(tempfile.mkdtemp(prefix=".release-", dir=out_dir))
    try:
        shutil.copytree(AGENT_SOURCE, tmp / "edgeship_agent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        runs = []
        for art in artifacts:
            rid = run_id(art.backend, art.precision)
            dest = tmp / "artifacts" / rid
            dest.mkdir(parents=True)
            for name in art.files:
                src = art.workdir / name
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / name)
            size = sum((dest / n).stat().st_size for n in art.files)
            runs.append({"id": rid, "backend": art.backend, "precision": art.precision, "runner": art.runner,
                         "dir": f"artifacts/{rid}", "config": art.runner_config,
                         "batch": spec.input.shape[0], "artifact_bytes": size,
                         "artifact_sha256": _files_digest(dest, art.files),
                         "conversion": art.info})
        (tmp / "data").mkdir()
        for name, arr in sorted(arrays.items()):
            np.save(tmp / "data" / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        for name, pix in sorted(pixels.items()):
            write_pixels(tmp / "data" / f"{name}.npz", pix.values, int(pix.recipe["stride"]))
        validation = effective_validation(spec, target)
        agent = {"eval_dir": "data", "threads": target.threads, "warmup": validation.warmup,
                 "runs": validation.runs, "rounds": validation.rounds, "max_cv": validation.max_cv,
                 "retry_unstable": validation.retry_unstable, "batch": spec.input.shape[0],
                 "metric": spec.evaluation.metric_name, "inputs": list(evals.x),
                 "outputs": _outputs_block(spec, tmp)}
        if pixels:  # data file -> how its uint8 pixels become the input (part of the release id)
            agent["pixels"] = {name: pix.recipe for name, pix in sorted(pixels.items())}
        if spec.evaluation.tie_margin > 0.0:
            agent["tie_margin"] = spec.evaluation.tie_margin
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        release_id = hashlib.sha256(canonical_json({"files": files, "agent": agent, "runs": [
            {k: r[k] for k in ("id", "runner", "dir", "config")} for r in runs]}).encode()).hexdigest()
        manifest = {"release_id": release_id, "name": spec.name, "target": target.name, "agent": agent,
                    "runs": runs, "files": files, "provenance": provenance}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes 0700; a release is shared with whoever reads the results
        replace_dir(tmp, out_dir / "release")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc) is not None:
            raise disk_full_error(out_dir, "the release", need) from exc
        raise
    return out_dir / "release", release_id, manifest


def _outputs_block(spec: PipelineSpec, release: Path) -> dict[str, Any]:
    """The agent config's ``outputs``: every run returns its raw outputs for the host to score
    (float16 where the metric allows), after the spec's postprocess, whose module is copied into
    ``postprocess/`` (one file, numpy only: the agent loads it from there)."""
    from pipeline.metrics import spec_metric, spec_postprocess

    block: dict[str, Any] = {"float16": spec_metric(spec).float16_ok}
    post = spec_postprocess(spec)
    if post is not None:
        fn, source = post
        (release / "postprocess").mkdir()
        shutil.copyfile(source, release / "postprocess" / source.name)
        block["postprocess"] = {"file": f"postprocess/{source.name}", "function": fn.__name__}
    return block


def eval_file(index: int) -> str:
    """The release's data file of input ``index``: ``x`` for the first, ``x_1``, ``x_2``, ... after it
    (the agent reads the names from its config's ``inputs``, in this order)."""
    return "x" if index == 0 else f"x_{index}"


def eval_pixels(evals: Samples) -> dict[str, Pixels]:
    """Data file -> the uint8 pixels shipped instead of an input's float32 samples: an image
    source's pixels, or samples whose every value is a whole number 0..255 (shipped as they are,
    normalised by the identity); other inputs are not here and ship as float32."""
    out: dict[str, Pixels] = {}
    for i, (name, x) in enumerate(evals.x.items()):
        pix = evals.pixels.get(name) or _uint8_values(x)
        if pix is not None:
            out[eval_file(i)] = pix
    return out


def _uint8_values(x: np.ndarray) -> Pixels | None:
    """``x`` as uint8 with the identity recipe, if that gives back exactly its float32 bits."""
    if x.size == 0 or x.ndim < 2 or x.min() < 0 or x.max() > 255 or not np.isfinite(x).all():
        return None
    values = x.astype(np.uint8)
    how = recipe(1.0, [0.0], [1.0], "stored", stride=1)
    same = normalise(values, how).astype(np.float32).tobytes() == np.ascontiguousarray(x, np.float32).tobytes()
    return Pixels(values, how) if same else None


def eval_arrays(evals: Samples, reference: dict[str, np.ndarray],
                shipped: "set[str] | frozenset[str]" = frozenset()) -> dict[str, np.ndarray]:
    """What the release ships of the evaluation set as plain .npy: every input not ``shipped`` as
    pixels, class labels (label objects stay on the host) and the fp32 first output (what the
    device's top1/fidelity read)."""
    arrays = {eval_file(i): x.astype(np.float32) for i, x in enumerate(evals.x.values())
              if eval_file(i) not in shipped}
    arrays["reference"] = next(iter(reference.values())).astype(np.float32)
    labels = evals.class_labels()
    if labels is not None:
        arrays["y"] = labels.astype(np.int64)
    return arrays


def _release_bytes(artifacts: list[Artifact], arrays: list[np.ndarray]) -> int:
    """What the release folder will take at most: artifacts, evaluation arrays (pixels counted
    uncompressed), the agent, the manifest."""
    agent = sum(p.stat().st_size for p in AGENT_SOURCE.rglob("*.py"))
    files = sum((art.workdir / name).stat().st_size for art in artifacts for name in art.files)
    return agent + files + sum(a.nbytes + 128 * max(1, len(a)) for a in arrays) + 2**16


def _files_digest(folder: Path, names: list[str]) -> str:
    """One sha256 for an artifact: the hash of its single file, or over the sorted (name, hash) list."""
    if len(names) == 1:
        return sha256_file(folder / names[0])
    return hashlib.sha256(canonical_json({n: sha256_file(folder / n) for n in sorted(names)}).encode()).hexdigest()
