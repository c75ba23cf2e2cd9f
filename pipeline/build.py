"""Build: spec + target -> export -> optimize -> convert per (backend, precision) -> release folder.

Every stage is cached by content (pipeline.cache); a rebuild with nothing changed does no work
and says so. The release folder is written beside the old one and swapped in at the end, so a
failed build leaves the previous release and the cache intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import __version__
from pipeline.backends.base import Artifact, BuildContext, Samples
from pipeline.cache import Cache, sha256_file, source_digest
from pipeline.errors import ConversionError, EdgeshipError, SpecError
from pipeline.metrics import spec_sources
from pipeline.output import step
from pipeline.registry import get_backend, require_available
from pipeline.spec import PipelineSpec, TargetSpec, effective_validation

OPTIMIZE_PASSES = ("fold_conv_bn", "onnxslim", "infer_shapes")
CHECK_SAMPLES = 32
LOCK_WAIT_S = 3.0  # a second run on the same output folder waits this long, then says who holds it


# Output folders this process holds (resolved path -> depth): the CLI holds a deploy's folder for
# the whole command, and the build inside it takes the same lock again without blocking itself.
_HELD: dict[Path, int] = {}


@contextlib.contextmanager
def locked_out_dir(out_dir: Path, what: str = "build", wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``out_dir`` (``build/<spec>/<target>``) for one build or deploy, or fail naming the holder.

    Two runs on one folder would replace each other's release while the other uploads it (seen
    as "damaged" files on the device). ``flock(2)`` on ``out_dir/.lock``: the kernel drops it when
    the holder dies, so a killed run never leaves a stale lock. The holder's pid and command are
    written into the lock file for the one who waits. (pipeline.transport.lock is the device-side
    lock: a process on the device, for a lock that lives on another machine.)
    """
    key = out_dir.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock_or_fail(fd, out_dir, wait_s)
        with contextlib.suppress(OSError):  # who holds it is for the message only (a full disk is said later)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"edgeship {what} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the flock


def _flock_or_fail(fd: int, out_dir: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another edgeship run"
                raise EdgeshipError(f"{out_dir} is in use by {holder}; wait for it to finish, "
                                    "or give this run another --out") from None
            time.sleep(0.2)


@dataclass
class StageEvent:
    stage: str
    cached: bool
    seconds: float
    detail: str = ""


@dataclass
class BuildResult:
    spec: PipelineSpec
    target: TargetSpec
    release_dir: Path
    release_id: str
    manifest: dict[str, Any]
    artifacts: list[Artifact]
    reference_metric: dict[str, Any]
    events: list[StageEvent] = field(default_factory=list)


def _cache_detail(result: Any) -> str:
    return f"key {result.key[:12]}" + (f"  ({result.note})" if result.note else "")


def _timed(events: list[StageEvent], log: Callable[[str], None], stage: str, fn: Callable[[], Any],
           detail: Callable[[Any], str] = lambda r: "") -> Any:
    t0 = time.perf_counter()
    with step(stage):  # a spinner on a terminal, a start line on a pipe when it takes a while
        result = fn()
    cached = bool(getattr(result, "hit", False))
    ev = StageEvent(stage, cached, time.perf_counter() - t0, detail(result))
    events.append(ev)
    log(f"{stage:<24} {'cached' if cached else 'built '} {ev.seconds:7.2f}s  {ev.detail}")
    return result


def build(spec: PipelineSpec, target: TargetSpec, out_dir: Path, cache: Cache | None = None,
          log: Callable[[str], None] = print) -> BuildResult:
    """Run every build stage for ``target`` and write ``out_dir/release`` (holding ``out_dir``)."""
    with locked_out_dir(out_dir, "build"):
        return _build(spec, target, out_dir, cache or Cache(), log)


@dataclass
class _Stages:
    """The spec's model stages (export, optimize): their inputs and what they have produced so far."""

    spec: PipelineSpec
    cache: Cache
    log: Callable[[str], None]
    events: list[StageEvent] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)

    def timed(self, stage: str, fn: Callable[[], Any], detail: Callable[[Any], str] = _cache_detail) -> Any:
        return _timed(self.events, self.log, stage, fn, detail)

    def torch_model(self) -> Any:
        """The PyTorch module, loaded once and only by the routes that need it."""
        from pipeline.stages.inputs import model_loader

        if self.spec.model.onnx:
            raise ConversionError(f"{self.spec.source_path}: field 'model.onnx': this route needs the PyTorch "
                                  "model; give model.factory (or model.exported) instead of an ONNX file")
        if "m" not in self.models:
            self.models["m"] = model_loader(self.spec)()
        return self.models["m"]


@dataclass
class _Run(_Stages):
    """One build: the model stages for one target, whose backends the conversions follow."""

    target: TargetSpec = field(kw_only=True)


def optimized_model(spec: PipelineSpec, cache: Cache | None = None,
                    log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The optimized ONNX model the backends consume, and the optimize stage's info, through the
    build's own export and optimize stages (cached, shared with builds): what ``edgeship analyze``
    reads. Only the calibration samples are loaded (the export traces with them, the optimize
    stage checks on them): no evaluation set, no target, no conversion, no release."""
    run = _Stages(spec, cache or Cache(), log)
    calib = _load_calibration(run)
    onnx_raw, _, _ = _export(run, calib)
    onnx_opt, opt_info = _optimize(run, onnx_raw, calib.head(CHECK_SAMPLES, "").x)
    _check_input_names(spec, _io_names(onnx_opt)[0])
    return onnx_opt, opt_info


def input_shapes(spec: PipelineSpec) -> dict[str, list[int]]:
    """The spec's input shapes by name: a dynamic batch is analysed at the spec's batch."""
    return {i.name: i.shape for i in spec.input_specs()}


def _check_builds(target: TargetSpec) -> None:
    require_available(sorted({b.backend for b in target.builds}))
    for b in target.builds:
        backend = get_backend(b.backend)
        for p in b.precisions:
            if p not in backend.precisions:
                raise SpecError(f"{target.source_path}: field 'builds': backend {b.backend!r} cannot build "
                                f"{p!r}; it supports {', '.join(backend.precisions)}")


def _load_calibration(run: _Stages) -> Samples:
    from pipeline.stages.inputs import load_samples

    return run.timed("load calibration set", lambda: load_samples(run.spec, "calibration"),
                     lambda s: f"{len(s)} samples sha256:{s.sha256[:12]}")


def _load_data(run: _Run) -> tuple[Samples, Samples]:
    """Calibration and evaluation samples, disjoint, the evaluation cut to validation.samples."""
    from pipeline.stages.inputs import check_disjoint, load_samples

    spec, target = run.spec, run.target
    calib = _load_calibration(run)
    evals = run.timed("load evaluation set", lambda: load_samples(spec, "evaluation"),
                      lambda s: f"{len(s)} samples sha256:{s.sha256[:12]}")
    check_disjoint(calib, evals, spec)
    limit = effective_validation(spec, target).samples
    if limit and limit < len(evals):
        evals = evals.head(limit, f"{evals.sha256}[:{limit}]")
        run.log(f"{'evaluation subset':<24} first {limit} samples (validation.samples of {target.name})")
    if spec.evaluation.metric != "fidelity" and evals.y is None:
        raise SpecError(f"{spec.source_path}: field 'evaluation.metric': {spec.evaluation.metric_name} needs labels, "
                        "the evaluation set has none; return (x, labels) from the source, or use metric: fidelity")
    return calib, evals


def _export(run: _Stages, calib: Samples) -> tuple[Path, dict[str, Any], str]:
    """The exported (or imported) ONNX model, its export info and the weights' digest (cached)."""
    import torch  # the export and TFLite routes need it; fail early if missing

    from pipeline.stages.export import export_onnx
    from pipeline.stages.inputs import model_identity, state_hash

    spec = run.spec
    if spec.model.onnx:
        from pipeline.stages.onnx_guard import check_onnx_file

        user_onnx = spec.resolve_path(spec.model.onnx)
        external = check_onnx_file(user_onnx)  # parses, external data inside, checker
        weights = sha256_file(user_onnx) + "".join(sha256_file(user_onnx.parent / e) for e in external)
        stage_name, export_fn = "import onnx", lambda d: _write_json(d / "info.json", _import_onnx(user_onnx, d))
    else:
        weights = state_hash(run.torch_model())
        stage_name = "export onnx"
        export_fn = lambda d: _write_json(d / "info.json", export_onnx(spec, run.torch_model, calib.x, d).info)  # noqa: E731
    export_parts = {"model": model_identity(spec), "weights": weights,
                    "input": [i.model_dump() for i in spec.input_specs()], "outputs": spec.outputs,
                    "export": spec.export, "torch": torch.__version__, "edgeship": __version__,
                    "code": source_digest("pipeline.stages.export")}
    exported = run.timed(stage_name, lambda: run.cache.get_or_build("export", export_parts, export_fn))
    return exported.path / "model.onnx", json.loads((exported.path / "info.json").read_text()), weights


def _optimize(run: _Stages, onnx_raw: Path, check_x: dict[str, np.ndarray]) -> tuple[Path, dict[str, Any]]:
    """Conv+BN folding, slimming and shape inference (cached), numerically checked on ``check_x``."""
    from pipeline.stages.optimize import optimize_onnx

    parts = {"onnx": sha256_file(onnx_raw), "passes": OPTIMIZE_PASSES, "edgeship": __version__,
             "code": source_digest("pipeline.stages.optimize")}
    optimized = run.timed("optimize (fold, slim)", lambda: run.cache.get_or_build(
        "optimize", parts, lambda d: _write_json(d / "info.json", optimize_onnx(
            onnx_raw, d / "model.onnx", check_x, run.spec.input.shape[0]))))
    return optimized.path / "model.onnx", json.loads((optimized.path / "info.json").read_text())


def _convert_key(run: _Run, backend: Any, build_spec: Any, precision: str, onnx_sha: str, weights: str,
                 calib: Samples) -> dict[str, Any]:
    """Everything a converted artifact depends on: a change to any of it rebuilds the artifact."""
    spec = run.spec
    return {
        "onnx": onnx_sha, "weights": weights, "backend": backend.name, "precision": precision,
        "versions": backend.version(), "options": build_spec.options,
        # the floor is this backend's: a per-backend floor edited for one runtime rebuilds only it
        "calibration": spec.calibration.model_dump(exclude={"source", "limit", "min_sqnr_db"})
        | {"sha256": calib.sha256, "min_sqnr_db": spec.calibration.floor_for(backend.name)},
        "budget": [spec.accuracy.max_drop_pp, run.target.limits.max_accuracy_drop_pp],
        # the holdout's drop (method choice, fallback) counts ties within this margin
        **({"tie_margin": spec.evaluation.tie_margin} if spec.evaluation.tie_margin else {}),
        # the INT8 search optimises the spec's metric (on postprocessed outputs): the user's code
        # behind them too, so editing metric.py beside the spec reruns the search
        "metric": spec.evaluation.model_dump(mode="json", include={"metric", "postprocess"}),
        **({"metric_sources": spec_sources(spec)} if precision == "int8" else {}),
        "input": [i.model_dump() for i in spec.input_specs()], "edgeship": __version__,
        # a precision its backend tunes to the target's CPU (ncnn int8: the depthwise convs x86 runs
        # faster in float) differs per arch
        **({"arch": run.target.arch} if precision in getattr(backend, "arch_dependent", ()) else {}),
        "code": source_digest(type(backend).__module__.rpartition(".")[0], "pipeline.backends.checks",
                              "calibration", f"pipeline.agent.runners.{backend.name}"),
    }


def _convert_into(d: Path, backend: Any, precision: str, ctx: BuildContext) -> None:
    """Run one converter into ``d``; a converter's own exception becomes one ConversionError line."""
    try:
        art = backend.convert(ctx, precision)
    except EdgeshipError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConversionError(f"{backend.name} {precision}: conversion failed: {type(exc).__name__}: {first}") from exc
    _write_json(d / "artifact.json", {"backend": art.backend, "precision": art.precision, "files": art.files,
                                       "runner": art.runner, "runner_config": art.runner_config, "info": art.info})


def _convert_all(run: _Run, onnx_opt: Path, weights: str, calib: Samples, check: Samples,
                 reference_check: dict[str, np.ndarray]) -> list[Artifact]:
    """Every backend x precision of the target, each cached by :func:`_convert_key`."""
    onnx_sha = sha256_file(onnx_opt)
    input_names, output_names = _io_names(onnx_opt)
    artifacts: list[Artifact] = []
    for build_spec in run.target.builds:
        backend = get_backend(build_spec.backend)
        for precision in build_spec.precisions:
            ctx_parts = _convert_key(run, backend, build_spec, precision, onnx_sha, weights, calib)

            def convert(d: Path, backend=backend, precision=precision, build_spec=build_spec) -> None:
                ctx = BuildContext(spec=run.spec, target=run.target, build=build_spec, workdir=d, onnx_fp32=onnx_opt,
                                   input_names=input_names, output_names=output_names, calibration=calib,
                                   check=check,
                                   reference=reference_check, cache_dir=run.cache.root.parent,
                                   torch_model=run.torch_model, log=run.log)
                _convert_into(d, backend, precision, ctx)

            entry = run.timed(f"{backend.name} {precision}", lambda convert=convert, ctx_parts=ctx_parts:
                              run.cache.get_or_build("convert", ctx_parts, convert))
            meta = json.loads((entry.path / "artifact.json").read_text())
            if precision == "int8":
                meta["info"]["int8_coverage"] = _int8_coverage(run, backend, entry.key, entry.path, meta)
            artifacts.append(Artifact(meta["backend"], meta["precision"], entry.path, meta["files"],
                                      meta["runner"], meta["runner_config"], meta["info"]))
    return artifacts


def _int8_coverage(run: _Run, backend: Any, artifact_key: str, workdir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """How many of an int8 artifact's compute ops run in int8 (pipeline.backends.coverage), cached
    apart from the conversion so that changing the analysis never reruns a calibration search."""
    from pipeline.backends.coverage import artifact_coverage

    parts = {"artifact": artifact_key, "versions": backend.version(),
             "code": source_digest("pipeline.backends.coverage", f"pipeline.agent.runners.{meta['runner']}")}
    entry = run.cache.get_or_build("coverage", parts, lambda d: _write_json(d / "coverage.json", artifact_coverage(
        meta["runner"], workdir, meta["runner_config"], run.target.threads)))
    return json.loads((entry.path / "coverage.json").read_text())


def _build(spec: PipelineSpec, target: TargetSpec, out_dir: Path, cache: Cache,
           log: Callable[[str], None]) -> BuildResult:
    from pipeline.analyze import analyze_onnx
    from pipeline.stages.export import first_output, run_onnx
    from pipeline.spec import check_spec_for_target
    from pipeline.stages.inputs import data_warnings
    from pipeline.stages.package import package_release
    from pipeline.validate.scoring import write_host_eval

    check_spec_for_target(spec, target)  # exit 2 before any work (e.g. model.onnx with a PyTorch-only backend)
    run = _Run(spec, cache, log, target=target)
    _check_builds(target)
    calib, evals = _load_data(run)
    onnx_raw, export_info, weights = _export(run, calib)
    check = calib.head(CHECK_SAMPLES, "")
    onnx_opt, opt_info = _optimize(run, onnx_raw, check.x)
    _check_input_names(spec, _io_names(onnx_opt)[0])
    batch = spec.input.shape[0]
    reference_eval = run_onnx(onnx_opt, evals.x, batch)
    reference_check = run_onnx(onnx_opt, check.x, batch)
    # classes known now: labels out of range are an error, doubtful data a warning the report shows
    notes = data_warnings(spec, target, first_output(reference_eval), {"calibration": calib, "evaluation": evals})
    ref_metric, ref_outputs = _reference_metric(spec, reference_eval, evals)
    ref_metric |= {"warnings": notes} if notes else {}
    log(f"{'fp32 reference':<24} {_fmt_metric(ref_metric)}")
    for note in notes:
        log(f"{'WARNING':<24} {note}")
    artifacts = _convert_all(run, onnx_opt, weights, calib, check, reference_check)
    provenance = {
        "spec": {"name": spec.name, "path": str(spec.source_path), "sha256": sha256_file(spec.source_path)
                 if spec.source_path else None},
        "target": target.model_dump(mode="json"),
        "model": {"weights_sha256": weights, "onnx_sha256": sha256_file(onnx_opt), "export": export_info,
                  "optimize": opt_info, "analysis": analyze_onnx(onnx_opt, input_shapes(spec))},
        "calibration_set": {"sha256": calib.sha256, "samples": len(calib)},
        "evaluation_set": {"sha256": evals.sha256, "samples": len(evals), "metric": spec.evaluation.metric_name},
        "reference": ref_metric,
        "tools": _tool_versions(target),
    }
    release_dir, release_id, manifest = run.timed(
        "package release", lambda: package_release(out_dir, spec, target, artifacts, evals, reference_eval, provenance),
        lambda r: f"release {r[1][:12]}")
    write_host_eval(release_dir, release_id, evals.y, ref_outputs)  # labels and fp32 outputs stay on the host
    return BuildResult(spec, target, release_dir, release_id, manifest, artifacts, ref_metric, run.events)


def _io_names(path: Path) -> tuple[list[str], list[str]]:
    """The graph's inputs (initializers left out) and outputs, in order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits], [o.name for o in graph.output]


def _check_input_names(spec: PipelineSpec, model_inputs: list[str]) -> None:
    """The spec names the model's inputs, in order (an imported ONNX file keeps its own names)."""
    names = [i.name for i in spec.input_specs()]
    if names == model_inputs:
        return
    if len(names) == 1 and len(model_inputs) == 1:
        raise SpecError(f"{spec.source_path}: field 'input.name': the model's input is called {model_inputs[0]!r}, "
                        f"not {names[0]!r}; set input.name: {model_inputs[0]}")
    raise SpecError(f"{spec.source_path}: field 'inputs': the model's inputs are {model_inputs}, the spec names "
                    f"{names}; list them with these names, in this order")


def _import_onnx(src: Path, out_dir: Path) -> dict[str, Any]:
    """A user's ONNX file (external data already checked to stay in its folder), as one file."""
    import onnx

    model = onnx.load(str(src))  # loads external data from beside the model
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / "model.onnx"))
    return {"source": "onnx", "path": str(src), "opset": [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]}


def _reference_metric(spec: PipelineSpec, outputs: dict[str, np.ndarray],
                      evals: Samples) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fp32 value of the spec's metric (the registry's, on the postprocessed fp32 outputs, as
    the device's runs are scored) and those outputs; bad labels or user code fail here, before any
    conversion, in one line."""
    from pipeline.metrics import postprocessed, spec_metric, spec_postprocess, spec_sources

    metric = spec_metric(spec)
    post = spec_postprocess(spec)
    reference = postprocessed(spec, outputs, spec.input.shape[0], post[0] if post else None)
    score = metric.evaluate(reference, evals.y, reference)
    out: dict[str, Any] = {"metric": metric.name, "higher_is_better": metric.higher_is_better,
                           "accuracy": score.value, "samples": len(evals),
                           "source": "fp32 ONNX Runtime on the host" + (
                               " (fidelity: agreement with itself)" if metric.name == "fidelity" else "")}
    if score.extras:
        out["metrics"] = score.extras
    sources = spec_sources(spec)
    if sources:  # which version of the user's metric / postprocess gave these numbers
        out["sources"] = sources
    if spec.evaluation.tie_margin > 0.0:
        out["tie_margin"] = spec.evaluation.tie_margin  # runs are gated on agreement within ties
    return out, reference


def _fmt_metric(m: dict[str, Any]) -> str:
    from pipeline.metrics import BUILTIN

    unit = "%" if m["metric"] in BUILTIN else ""
    return f"{m['metric']} {m['accuracy']:.2f}{unit} on {m['samples']} samples"


def _git_commit() -> str | None:
    """The working directory's git commit (``+dirty`` with uncommitted changes), None outside a repo:
    a nightly's numbers are traced to the code that produced them."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _tool_versions(target: TargetSpec) -> dict[str, Any]:
    versions: dict[str, Any] = {"edgeship": __version__, "commit": _git_commit(), "python": sys.version.split()[0],
                                "host": platform.platform()}
    import numpy
    import torch

    versions.update({"torch": torch.__version__, "numpy": numpy.__version__})
    for name in sorted({b.backend for b in target.builds}):
        versions[name] = get_backend(name).version()
    return versions


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
