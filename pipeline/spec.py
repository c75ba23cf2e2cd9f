"""Declarative specs: the pipeline spec (what to build) and targets (where it runs).

Both are pydantic v2 models with ``extra="forbid"`` so a typo is an error, not a silent default.
Loading goes through :func:`load_spec` / :func:`load_target`, which turn every problem into a
:class:`~pipeline.errors.SpecError` whose message is one line naming the file, the field and the
fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SpecError

Precision = Literal["fp32", "fp16", "int8"]
Arch = Literal["x86_64", "aarch64", "armv7l"]
BACKENDS = ("onnxruntime", "tflite", "ncnn", "tensorrt")
CALIBRATION_METHODS = ("auto", "minmax", "percentile", "entropy", "mse", "ort-default")
_SECRET_KEYS = re.compile(r"pass(word|phrase)?|secret|token|private_key", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# --------------------------------------------------------------------------------------------
# Pipeline spec
# --------------------------------------------------------------------------------------------


class ModelSource(_Strict):
    """Where the PyTorch model comes from: exactly one of ``factory``, ``checkpoint``, ``exported``.

    ``factory`` is ``module:function`` returning an ``nn.Module`` (kwargs go to it).
    ``checkpoint`` is a state dict loaded with ``weights_only=True`` into ``factory``'s module.
    ``exported`` is a ``torch.export`` ``.pt2`` file (ExportedProgram).
    """

    factory: str | None = Field(None, description="module:function returning a torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = Field(None, description="state_dict file (.pt), loaded with weights_only=True")
    exported: str | None = Field(None, description="torch.export ExportedProgram file (.pt2)")
    onnx: str | None = Field(None, description="an ONNX model to start from (skips the export stage; "
                                               "routes that leave from PyTorch, e.g. tflite, are unavailable)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        given = [k for k in ("factory", "exported", "onnx") if getattr(self, k)]
        if not given:
            raise ValueError("give 'factory' (module:function), 'exported' (.pt2 file) or 'onnx' (.onnx file)")
        if len(given) > 1:
            raise ValueError(f"give one model source, not {' and '.join(given)}")
        if self.checkpoint and not self.factory:
            raise ValueError("'checkpoint' needs 'factory' to build the module it loads into")
        if self.factory and ":" not in self.factory:
            raise ValueError(f"factory {self.factory!r} must be 'module:function'")
        return self


class InputSpec(_Strict):
    name: str = "input"
    shape: list[int] = Field(..., min_length=1, description="full shape including the batch dim")
    dtype: Literal["float32"] = "float32"
    batch: Literal["static", "dynamic"] = Field(
        "static", description="static: batch fixed to shape[0]; dynamic: batch is a symbolic dim"
    )
    layout: Literal["NCHW", "NHWC", "NC"] = "NCHW"

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("every dimension must be a positive integer")
        return v


class Preprocessing(_Strict):
    """Applied to image-folder data only; array sources are taken as already preprocessed."""

    resize: list[int] | None = Field(None, min_length=2, max_length=2, description="[height, width]")
    color: Literal["rgb", "grayscale"] = "rgb"
    scale: float = Field(1.0 / 255.0, description="multiplier applied to uint8 pixels first")
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])


class PythonSource(_Strict):
    kind: Literal["python"]
    callable: str = Field(..., description="module:function returning (x, labels) or x as numpy arrays")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class NpzSource(_Strict):
    kind: Literal["npz"]
    path: str = Field(..., description=".npz with 'x' (and optional 'y'), or a .npy of samples")


class ImageFolderSource(_Strict):
    kind: Literal["images"]
    path: str = Field(..., description="folder of images; class sub-folders give labels")


DataSource = Annotated[Union[PythonSource, NpzSource, ImageFolderSource], Field(discriminator="kind")]


class CalibrationSpec(_Strict):
    source: DataSource
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    method: str = Field("auto", description="auto | minmax | percentile | entropy | mse | ort-default")
    percentile: float = Field(99.99, gt=50, le=100)
    activations: Literal["symmetric", "asymmetric"] = "asymmetric"
    per_channel: bool = True
    fallback: bool = Field(True, description="keep the most sensitive layers in float to meet the budget")
    holdout_fraction: float = Field(0.2, ge=0.0, lt=0.9)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in CALIBRATION_METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
        return v


class EvaluationSpec(_Strict):
    source: DataSource
    limit: int | None = Field(None, gt=0)
    metric: Literal["top1", "fidelity"] = Field(
        "top1", description="top1: accuracy vs labels; fidelity: top-1 agreement and SQNR vs fp32"
    )
    tie_margin: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="fidelity only: a top-1 swap between two classes whose fp32 probabilities (softmax of "
                    "the outputs) are within this margin counts as agreement; 0 is strict. Strict "
                    "agreement is always reported beside it",
    )

    @model_validator(mode="after")
    def _tie_margin_needs_fidelity(self) -> "EvaluationSpec":
        if self.tie_margin > 0.0 and self.metric != "fidelity":
            raise ValueError("tie_margin applies to metric 'fidelity' only; remove it or set metric: fidelity")
        return self


class AccuracySpec(_Strict):
    max_drop_pp: float = Field(1.0, ge=0, description="largest accuracy drop vs fp32, percentage points")


class ValidationSpec(_Strict):
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=1)
    samples: int | None = Field(None, gt=0, description="evaluate on the first N evaluation samples only "
                                                         "(slow or emulated devices); the fp32 reference uses the same N")


class PipelineSpec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    model: ModelSource
    input: InputSpec
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
    validation: ValidationSpec | None = Field(None, description="overrides the target's validation")
    export: dict[str, Any] = Field(default_factory=lambda: {"opset": 18})

    # Filled by the loader, not by users.
    source_path: Path | None = Field(None, exclude=True)

    def resolve_path(self, p: str) -> Path:
        """Resolve a path from the spec relative to the spec file's folder."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute() or self.source_path is None:
            return path
        return (self.source_path.parent / path).resolve()


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


class Host(_Strict):
    name: str
    host: str
    port: int = Field(22, gt=0, lt=65536)
    user: str = "root"
    key_file: str | None = Field(None, description="path to the private key; never the key itself")
    arch: Arch | None = Field(None, description="this host's architecture when a mixed fleet differs from "
                                                "the target's arch (only for artifacts that run on both)")


class TransportSpec(_Strict):
    kind: Literal["local", "ssh"] = "local"
    hosts: list[Host] = Field(default_factory=list)
    root: str = Field("/opt/edgeship", description="folder on the device holding releases/ and current")
    python: str = Field("python3", description="interpreter of the device's runtime environment")
    known_hosts: str | None = Field(None, description="edgeship-owned known_hosts (default ~/.edgeship/known_hosts)")
    connect_timeout_s: float = Field(15.0, gt=0)
    command_timeout_s: float = Field(900.0, gt=0)
    transfer_timeout_s: float = Field(300.0, gt=0)
    keepalive_s: float = Field(10.0, gt=0)
    keep_releases: int = Field(3, ge=1)
    parallel: int = Field(4, ge=1, description="devices deployed at once in a fleet")

    @model_validator(mode="after")
    def _hosts(self) -> "TransportSpec":
        if self.kind == "ssh" and not self.hosts:
            raise ValueError("an ssh transport needs at least one entry in 'hosts'")
        return self


class RuntimeSpec(_Strict):
    """The device's runtime environment, used by provisioning and checked before a deploy."""

    python: str = Field(">=3.9", description="version specifier for the device's python")
    packages: dict[str, str] = Field(default_factory=dict, description="pip name -> exact version")
    index_url: str | None = None


class BuildSpec(_Strict):
    backend: str
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32", "int8"], min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; choose one of {', '.join(BACKENDS)}")
        return v


class Limits(_Strict):
    max_accuracy_drop_pp: float | None = Field(None, ge=0, description="overrides the spec's budget if tighter")
    max_latency_p90_ms: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)
    max_artifact_mb: float | None = Field(None, gt=0)


class Hardware(_Strict):
    """What the board is. Informational, recorded in the manifest, used for power estimates."""

    cpu: str | None = None
    cores: int | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    accelerator: str | None = None
    tdp_w: float | None = Field(None, gt=0, description="typical board power under load, watts")
    l4t: str | None = Field(None, description="Jetson: expected L4T release")


class TargetSpec(_Strict):
    name: str
    extends: str | None = None
    description: str = ""
    arch: Arch
    os: Literal["linux"] = "linux"
    hardware: Hardware = Field(default_factory=Hardware)
    transport: TransportSpec = Field(default_factory=TransportSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    builds: list[BuildSpec] = Field(..., min_length=1)
    threads: int = Field(2, ge=1)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    limits: Limits = Field(default_factory=Limits)

    source_path: Path | None = Field(None, exclude=True)

    def runs(self) -> list[tuple[str, str]]:
        """Every (backend, precision) pair this target builds, in declaration order."""
        return [(b.backend, p) for b in self.builds for p in b.precisions]


# --------------------------------------------------------------------------------------------
# Loading, with one-line errors
# --------------------------------------------------------------------------------------------


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, str) or not p.startswith("function-"))
    kind = err.get("type", "")
    msg = err.get("msg", "invalid")
    got = err.get("input")
    if kind == "extra_forbidden":
        field = str(err["loc"][-1])
        if _SECRET_KEYS.search(field):
            return (f"field '{loc}': secrets do not belong in target files; "
                    "use an SSH key (key_file) or ssh-agent instead")
        return f"field '{loc}': unknown field; remove it or check its spelling"
    if kind == "missing":
        return f"field '{loc}': required field is missing; add it"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"field '{loc}': {msg}"
    text = f"field '{loc}': {msg}" if loc else msg
    if got is not None and not isinstance(got, (dict, list)):
        text += f" (got {got!r})"
    return text


def _validation_message(path: Path, exc: ValidationError) -> str:
    errors = exc.errors()
    first = _describe_error(errors[0])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {first}{more}"


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"{path}: {what} file not found; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"{path}:{where}: {problem}; fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def load_spec(path: str | Path) -> PipelineSpec:
    """Load and validate a pipeline spec, checking that the files it names exist."""
    path = Path(path)
    data = _read_yaml(path, "pipeline spec")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_validation_message(path, exc)) from None
    spec.source_path = path.resolve()
    _check_spec_files(spec, path)
    return spec


def _check_spec_files(spec: PipelineSpec, path: Path) -> None:
    checks: list[tuple[str, str | None]] = [
        ("model.checkpoint", spec.model.checkpoint),
        ("model.exported", spec.model.exported),
        ("model.onnx", spec.model.onnx),
    ]
    for section in ("calibration", "evaluation"):
        src = getattr(spec, section).source
        if isinstance(src, (NpzSource, ImageFolderSource)):
            checks.append((f"{section}.source.path", src.path))
    for field, value in checks:
        if value and not spec.resolve_path(value).exists():
            raise SpecError(f"{path}: field '{field}': file {value!r} not found; "
                            "paths are relative to the spec file")


def project_root() -> Path:
    """The folder holding ``targets/`` and ``examples/`` (the repository root when installed -e)."""
    return Path(__file__).resolve().parent.parent


def target_dirs() -> list[Path]:
    """Where target names are looked up: $EDGESHIP_TARGETS_PATH, ./targets, the project's targets/."""
    dirs: list[Path] = []
    env = os.environ.get("EDGESHIP_TARGETS_PATH")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(Path.cwd() / "targets")
    dirs.append(project_root() / "targets")
    seen: list[Path] = []
    for d in dirs:
        if d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def find_target_file(name_or_path: str) -> Path:
    """A target by file path, or by name in :func:`target_dirs`."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if candidate.is_file():
            return candidate
        raise SpecError(f"{candidate}: target file not found; check the path")
    for d in target_dirs():
        for ext in (".yaml", ".yml"):
            p = d / f"{name_or_path}{ext}"
            if p.is_file():
                return p
    known = ", ".join(sorted(list_target_names())) or "none"
    raise SpecError(f"target {name_or_path!r} not found in {', '.join(str(d) for d in target_dirs())}; "
                    f"known targets: {known}")


def list_target_names() -> list[str]:
    names: set[str] = set()
    for d in target_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.y*ml"))
    return sorted(names)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; lists and scalars in ``over`` replace those in ``base``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_target_data(name_or_path: str, _chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """Read a target and everything it ``extends:``, merged child-over-parent (unvalidated)."""
    path = find_target_file(name_or_path)
    data = _read_yaml(path, "target")
    key = str(path.resolve())
    if key in _chain:
        cycle = " -> ".join(Path(c).stem for c in (*_chain, key))
        raise SpecError(f"{path}: field 'extends': cycle {cycle}; remove one of the links")
    parent = data.get("extends")
    if parent is None:
        return data, path
    if not isinstance(parent, str):
        raise SpecError(f"{path}: field 'extends': expected a target name, got {parent!r}")
    try:
        base, _ = resolve_target_data(parent, (*_chain, key))
    except SpecError as exc:
        if "cycle" in str(exc):
            raise
        raise SpecError(f"{path}: field 'extends': {exc}") from None
    merged = _deep_merge(base, {k: v for k, v in data.items() if k != "extends"})
    merged["extends"] = parent
    # A child never inherits its parent's name.
    merged["name"] = data.get("name", path.stem)
    return merged, path


def load_target(name_or_path: str) -> TargetSpec:
    """Load a target by name or path, resolving ``extends:``, and validate it."""
    data, path = resolve_target_data(name_or_path)
    data.setdefault("name", path.stem)
    try:
        target = TargetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_validation_message(path, exc)) from None
    target.source_path = path.resolve()
    return target


def _schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = title
    schema.get("properties", {}).pop("source_path", None)
    return schema


def target_schema() -> dict[str, Any]:
    """JSON Schema for target files (for editors: yaml-language-server's $schema)."""
    return _schema(TargetSpec, "edgeship target")


def spec_schema() -> dict[str, Any]:
    """JSON Schema for pipeline specs."""
    return _schema(PipelineSpec, "edgeship pipeline spec")
