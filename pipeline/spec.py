"""Declarative specs: the pipeline spec (what to build) and targets (where it runs).

Both are pydantic v2 models with ``extra="forbid"`` so a typo is an error, not a silent default.
Loading goes through :func:`load_spec` / :func:`load_target`, which turn every problem into a
:class:`~pipeline.errors.SpecError` whose message is one line naming the file, the field and the
fix.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from pipeline.errors import SpecError
from pipeline.paths import project_home
from pipeline.registry import BACKENDS as _REGISTERED
from pipeline.registry import NEEDS_PYTORCH

Precision = Literal["fp32", "fp16", "int8"]
Arch = Literal["x86_64", "aarch64", "armv7l"]
BACKENDS = tuple(_REGISTERED)  # the registry is the one list of backends
CALIBRATION_METHODS = ("auto", "minmax", "percentile", "entropy", "mse", "ort-default")
_SECRET_KEYS = re.compile(r"pass(word|phrase)?|secret|token|private_key|credential|api_?key", re.IGNORECASE)
# Limits on what a timeout may be: a day for a command or a transfer (a TensorRT engine build on a
# small board takes minutes, not days), five minutes to connect or between keepalives.
MAX_COMMAND_TIMEOUT_S = 86_400.0
MAX_CONNECT_TIMEOUT_S = 300.0


class _Strict(BaseModel):
    # No .inf / .nan anywhere: an infinite timeout or budget is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


# Names become folder names (build/<spec>/<target>, <root>/<spec>/ on a device): one path
# component, no leading '.' or '-' (so never '.', '..', a hidden file or an option).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _safe_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise PydanticCustomError(
            "unsafe_name", "a name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names folders under build/ and on the device); e.g. 'my-board'")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name), Field(json_schema_extra={"pattern": f"^{_NAME.pattern}$"})]


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
        if self.checkpoint and not self.factory:
            raise ValueError("'checkpoint' needs 'factory' beside it: the module:function that builds the "
                             "module the state dict is loaded into")
        if not given:
            raise ValueError("give 'factory' (module:function), 'exported' (.pt2 file) or 'onnx' (.onnx file)")
        if len(given) > 1:
            raise ValueError(f"give one model source, not {' and '.join(given)}")
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


PositiveInt = Annotated[int, Field(gt=0)]


class Preprocessing(_Strict):
    """Applied to image-folder data only; array sources are taken as already preprocessed.

    Geometry: ``resize`` (plain, to [h, w]) or ``resize_shorter`` (aspect kept), then
    ``center_crop``; with none of them images are resized to the input's size. Then
    ``(pixel * scale - mean) / std`` per channel, in ``color`` order, laid out as ``input.layout``.
    """

    resize: list[PositiveInt] | None = Field(None, min_length=2, max_length=2,
                                             description="[height, width], a plain resize (aspect not kept)")
    resize_shorter: PositiveInt | None = Field(None, description="resize the shorter side to this, keeping the "
                                                                 "aspect; needs center_crop")
    center_crop: list[PositiveInt] | None = Field(None, min_length=2, max_length=2,
                                                  description="[height, width] cut from the middle after resizing")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    color: Literal["rgb", "bgr", "grayscale"] = "rgb"
    scale: float = Field(1.0 / 255.0, description="multiplier applied to uint8 pixels first")
    mean: list[float] = Field(default_factory=lambda: [0.0], min_length=1, description="one value or one per channel")
    std: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="one value or one per channel")

    @model_validator(mode="after")
    def _consistent(self) -> "Preprocessing":
        if self.resize and self.resize_shorter:
            raise ValueError("give resize (plain, [h, w]) or resize_shorter (aspect kept), not both")
        if self.resize_shorter and not self.center_crop:
            raise ValueError("resize_shorter keeps each image's aspect, so sizes differ; add center_crop: [h, w]")
        channels = 1 if self.color == "grayscale" else 3
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, channels):
                raise ValueError(f"{name} has {len(getattr(self, name))} values; give 1 or {channels} "
                                 f"(one per channel of color {self.color})")
        if not all(self.std):
            raise ValueError("std must not be 0")
        return self

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) the geometry gives, or None when it is the input's size."""
        size = self.center_crop or self.resize
        return (size[0], size[1]) if size else None


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
    classes: list[str] | None = Field(None, min_length=1, description="class folder names in class-index order")
    classes_file: str | None = Field(None, description="text file: one class folder name per line, in class-index "
                                                       "order (relative to the spec)")
    labels: Literal["folder-number"] | None = Field(
        None, description="folder-number: a class folder's leading digits are its class index (0000_n01440764 -> 0)")
    include: list[str] | None = Field(None, min_length=1, description="read only the class folders whose names "
                                                                      "match one of these patterns (*, ?, [05])")

    @model_validator(mode="after")
    def _one_labelling(self) -> "ImageFolderSource":
        given = [k for k in ("classes", "classes_file", "labels") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of classes, classes_file and labels, not {' and '.join(given)}")
        if self.classes and len(set(self.classes)) != len(self.classes):
            dup = next(c for c in self.classes if self.classes.count(c) > 1)
            raise ValueError(f"classes names {dup!r} twice; each class folder has one index")
        return self


DataSource = Annotated[Union[PythonSource, NpzSource, ImageFolderSource], Field(discriminator="kind")]


SqnrFloor = Annotated[float, Field(gt=0, le=200)]


class CalibrationSpec(_Strict):
    source: DataSource
    limit: int | None = Field(None, gt=0, description="use at most this many samples")
    method: str = Field("auto", description="auto | minmax | percentile | entropy | mse | ort-default")
    percentile: float = Field(99.99, gt=50, le=100)
    activations: Literal["symmetric", "asymmetric"] = "asymmetric"
    per_channel: bool = True
    fallback: bool = Field(True, description="keep the most sensitive layers in float to meet the budget")
    min_sqnr_db: SqnrFloor | dict[str, SqnrFloor] | None = Field(
        None, description="fidelity floor: the fallback also keeps layers in float until the calibration holdout's "
                          "output SQNR against fp32 reaches this many dB (a 1 pp top-1 budget on a 100-image "
                          "holdout is one image; SQNR averages every output value). A mapping sets it per backend, "
                          "e.g. {default: 25, onnxruntime: 24}: a float layer costs each runtime differently")
    close_islands: StrictBool = Field(
        True, description="ONNX Runtime int8: let layout crossings (Transpose, (de)quantize, reorder) shape the "
                          "fallback, estimated from the layers' shapes: layers taken by output noise removed per unit "
                          "of time, then each int8 run between float layers whose crossings cost more than its int8 "
                          "saves kept float too; false keeps exactly the fallback's layers in fidelity order")
    holdout_fraction: float = Field(0.2, ge=0.0, lt=0.9)
    equalize: StrictBool | Literal["auto"] = Field(
        False, description="cross-layer equalisation before calibration (ONNX Runtime and TensorRT QDQ only): true "
                           "calibrates the equalised graph, auto scores both on the holdout and keeps the better")
    adaround: StrictBool | Literal["auto"] = Field(
        False, description="weight rounding learned on the calibration set (AdaRound; ONNX Runtime and TensorRT QDQ "
                           "only): true for every method, auto scores it beside round-to-nearest on the holdout")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in CALIBRATION_METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
        return v

    @field_validator("min_sqnr_db", mode="before")
    @classmethod
    def _floor(cls, v: Any) -> Any:
        """One message for either shape (the union's own errors name both of its branches)."""
        def ok(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 200

        if v is None or ok(v):
            return v
        if not isinstance(v, dict):
            raise ValueError("give dB in (0, 200], or a mapping per backend such as {default: 25, onnxruntime: 24}")
        unknown = sorted(str(k) for k in v if k not in ("default", *BACKENDS))
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r}; use default or one of {', '.join(BACKENDS)}")
        bad = next((k for k, x in v.items() if not ok(x)), None)
        if bad is not None:
            raise ValueError(f"{bad}: give dB in (0, 200] (got {v[bad]!r})")
        return v

    def floor_for(self, backend: str) -> float | None:
        """The fidelity floor (dB) of ``backend``'s INT8 search: the mapping's entry for it, else its
        ``default``, else none; a plain number is every backend's."""
        if isinstance(self.min_sqnr_db, dict):
            return self.min_sqnr_db.get(backend, self.min_sqnr_db.get("default"))
        return self.min_sqnr_db


_MODULE_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _module_function(value: str) -> str:
    if not _MODULE_FUNCTION.fullmatch(value):
        raise PydanticCustomError("module_function", "'{value}' is not 'module:function' (e.g. my_metrics:map50); "
                                  "modules beside the spec file are importable", {"value": value})
    return value


ModuleFunction = Annotated[str, AfterValidator(_module_function)]
BuiltinMetric = Literal["top1", "top5", "fidelity", "map"]


class UserMetricSpec(_Strict):
    """A metric of your own: ``callable(outputs, labels) -> float | {"value": float, ...}``."""

    callable: ModuleFunction = Field(..., description="module:function(outputs, labels) -> float, or a dict with "
                                                      "'value' and other figures reported beside it")
    name: SafeName = Field(..., description="what reports and results call the metric (e.g. map50)")
    higher_is_better: StrictBool = Field(True, description="false: the drop the budget holds is the increase")


class EvaluationSpec(_Strict):
    source: DataSource
    limit: int | None = Field(None, gt=0)
    metric: BuiltinMetric | UserMetricSpec = Field(
        "top1", description="top1 / top5: accuracy (%) vs class labels; fidelity: per-output SQNR and top-1 "
                            "agreement (%) vs fp32; map: COCO mAP@[.5:.95] x 100 (pycocotools); or your own "
                            "{callable: module:function, name, higher_is_better}. The budget is in its points")
    postprocess: ModuleFunction | None = Field(
        None, description="module:function(outputs) -> outputs, numpy only: runs per batch on the device (shipped "
                          "in the release) and on the host's fp32 outputs before the metric (e.g. decode + NMS)")
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

    @property
    def metric_name(self) -> str:
        """The metric's name: a built-in's, or the ``name`` of the user's."""
        return self.metric if isinstance(self.metric, str) else self.metric.name


class AccuracySpec(_Strict):
    max_drop_pp: float = Field(1.0, ge=0, description="largest accuracy drop vs fp32, percentage points")
    decision: Literal["point", "upper_bound"] = Field(
        "point", description="how a run's drop is held to the budget: point (the measured drop) or upper_bound "
                             "(the upper end of its 95 % interval; a straddling interval fails as inconclusive, "
                             "saying about how many samples would settle it)")


class ValidationSpec(_Strict):
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=1)
    rounds: int = Field(5, ge=1, le=1000, description="the timed runs of every artifact are spread over this many "
                                                       "interleaved rounds (A B C, B C A, ...), so load that comes "
                                                       "and goes is shared by all of them")
    max_cv: float = Field(0.15, gt=0, description="a run whose timings' coefficient of variation (stdev / mean) is "
                                                  "above this is flagged 'unstable'")
    retry_unstable: int = Field(0, ge=0, le=10, description="re-measure an unstable run up to N times")
    samples: int | None = Field(None, gt=0, description="evaluate on the first N evaluation samples only "
                                                         "(slow or emulated devices); the fp32 reference uses the same N")


class DeploySpec(_Strict):
    recommend: Literal["fastest", "smallest", "most-accurate"] = Field(
        "fastest", description="which run that passed the gate a release recommends: fastest (lowest latency p90), "
                               "smallest (fewest artifact bytes) or most-accurate (highest accuracy)")


_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")


def _output_names(names: list[str]) -> list[str]:
    bad = next((n for n in names if not _OUTPUT_NAME.fullmatch(n)), None)
    if bad is not None:
        raise PydanticCustomError("bad_output_name", "an output name starts with a letter or '_' and holds letters, "
                                  "digits, '_', '.', ':', '/' or '-' (it names an ONNX tensor); e.g. 'boxes'")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise PydanticCustomError("dup_output_name", "outputs names '{dup}' twice; each output has its own name",
                                  {"dup": dup})
    return names


class PipelineSpec(_Strict):
    name: SafeName
    description: str = ""
    model: ModelSource
    input: InputSpec | None = Field(None, description="the model's input (one); several go in 'inputs'")
    inputs: list[InputSpec] | None = Field(None, min_length=1, description="the model's inputs, in the order its "
                                                                            "forward() takes them")
    outputs: Annotated[list[str], AfterValidator(_output_names)] | None = Field(
        None, min_length=1, description="names of the model's outputs in the order it returns them (tuple, list or "
                                        "dict values); default: a dict's keys, else 'output' or output0, output1, ...")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
    validation: ValidationSpec | None = Field(None, description="overrides the target's validation")
    deploy: DeploySpec = Field(default_factory=DeploySpec, description="what a deploy does with its runs")
    export: dict[str, Any] = Field(default_factory=lambda: {"opset": 18})

    # Filled by the loader, not by users.
    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _one_input_field(self) -> "PipelineSpec":
        """``input`` (one) or ``inputs`` (several); afterwards ``input`` is the first of ``inputs``.

        Both are filled once validated, so ``spec.input`` (the batch, the first input) works for
        every spec; a dump of a validated spec (both, the first equal) validates again.
        """
        if self.input is None and self.inputs is None:
            raise ValueError("give 'input' (the model's input: name, shape) or 'inputs' (a list of them)")
        if self.input is not None and self.inputs is not None and self.inputs[0] != self.input:
            raise ValueError("give 'input' (one input) or 'inputs' (several), not both")
        inputs = self.inputs or [self.input]
        names = [i.name for i in inputs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"inputs name {dup!r} twice; give each input its own name (the model's)")
        first = inputs[0]
        other = next((i for i in inputs[1:] if (i.shape[0], i.batch) != (first.shape[0], first.batch)), None)
        if other is not None:
            raise ValueError(f"input {other.name!r} has batch {other.shape[0]} ({other.batch}), input {first.name!r} "
                             f"{first.shape[0]} ({first.batch}); every input takes the same samples on axis 0")
        object.__setattr__(self, "input", first)
        object.__setattr__(self, "inputs", list(inputs))
        return self

    def input_specs(self) -> list[InputSpec]:
        """Every input of the model, in order (one for a spec with ``input:``)."""
        assert self.inputs is not None  # filled by _one_input_field
        return self.inputs

    @model_validator(mode="after")
    def _images_fit_the_input(self) -> "PipelineSpec":
        """An image folder's preprocessing must end at the input's size and channels."""
        if not any(isinstance(getattr(self, s).source, ImageFolderSource) for s in ("calibration", "evaluation")):
            return self
        if len(self.input_specs()) > 1:
            raise ValueError("image folders feed one input; a model with several inputs takes its data from a "
                             "python or npz source (a dict input name -> array, or one npz array per input)")
        shape, layout = self.input.shape, self.input.layout
        if layout == "NC" or len(shape) != 4:
            raise ValueError("image folders need a 4-d image input (input.shape [N, C, H, W] with layout NCHW, "
                             "or [N, H, W, C] with NHWC)")
        c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
        size = self.preprocessing.output_size()
        if size is not None and size != (h, w):
            field = "center_crop" if self.preprocessing.center_crop else "resize"
            raise ValueError(f"preprocessing.{field} gives {size[0]}x{size[1]} images, input.shape expects {h}x{w}")
        want = 1 if self.preprocessing.color == "grayscale" else 3
        if c != want:
            raise ValueError(f"preprocessing.color {self.preprocessing.color} gives {want} channel(s), input.shape "
                             f"has {c}; set color (rgb | bgr | grayscale) or the shape")
        return self

    def resolve_path(self, p: str) -> Path:
        """Resolve a path from the spec relative to the spec file's folder."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute() or self.source_path is None:
            return path
        return (self.source_path.parent / path).resolve()


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def _plain_host(value: str) -> str:
    # ssh reads a leading '-' as an option and 'user:password@' would be a secret in the manifest.
    if not re.fullmatch(r"[A-Za-z0-9_.:\[\]%-]+", value) or value.startswith("-"):
        raise PydanticCustomError(
            "bad_host", "give a host name or IP address only (no user@, no spaces, not starting with '-'); "
            "the user goes in 'user', the key in 'key_file'")
    return value


class Host(_Strict):
    name: SafeName
    host: Annotated[str, AfterValidator(_plain_host)]
    port: int = Field(22, gt=0, lt=65536)
    user: str = "root"
    key_file: str | None = Field(None, description="path to the private key; never the key itself")
    arch: Arch | None = Field(None, description="this host's architecture when a mixed fleet differs from "
                                                "the target's arch (only for artifacts that run on both)")
    placeholder: StrictBool = Field(False, description="a shipped example's stand-in host: deploy refuses it "
                                                       "until a copy of the target names a real one")


class TransportSpec(_Strict):
    kind: Literal["local", "ssh"] = "local"
    hosts: list[Host] = Field(default_factory=list)
    root: str | None = Field(None, description="folder on the device holding the releases (default: ssh "
                                              "/opt/edgeship; local <project>/.edgeship/devices/<target>)")
    python: str = Field("python3", description="interpreter of the device's runtime environment")
    known_hosts: str | None = Field(None, description="the known_hosts file host keys are checked against (default "
                                                      "edgeship's ~/.edgeship/known_hosts; a file under ~/.ssh, e.g. "
                                                      "~/.ssh/known_hosts, is read but never written)")
    ssh_config: str | None = Field(None, description="OpenSSH client config whose Host aliases, HostName, User, Port, "
                                                     "IdentityFile, ProxyJump and HostKeyAlias apply (default "
                                                     "$EDGESHIP_SSH_CONFIG or ~/.ssh/config; 'none': not read)")
    # Bounded so that a typo cannot make a run wait forever (finite: see _Strict).
    connect_timeout_s: float = Field(15.0, gt=0, le=MAX_CONNECT_TIMEOUT_S)
    command_timeout_s: float = Field(900.0, gt=0, le=MAX_COMMAND_TIMEOUT_S)
    transfer_timeout_s: float = Field(300.0, gt=0, le=MAX_COMMAND_TIMEOUT_S)
    keepalive_s: float = Field(10.0, gt=0, le=MAX_CONNECT_TIMEOUT_S)
    keep_releases: int = Field(3, ge=1)
    parallel: int = Field(4, ge=1, description="devices deployed at once in a fleet")
    max_failures: Union[Annotated[int, Field(ge=1)], Annotated[str, Field(pattern=r"^([1-9][0-9]?|100)%$")],
                        None] = Field(None, description="stop a fleet rollout once this many hosts (e.g. 3) or this "
                                                        "share of them (e.g. '30%') failed: unreachable or gate failed")

    def device_root(self, target_name: str) -> str:
        """``root``, or the default: a local device is per project (next to its stage cache)."""
        if self.root:
            return self.root
        if self.kind == "local":
            return str(project_home() / "devices" / target_name)
        return "/opt/edgeship"

    @model_validator(mode="after")
    def _hosts(self) -> "TransportSpec":
        if self.kind == "ssh" and not self.hosts:
            raise ValueError("an ssh transport needs at least one entry in 'hosts'")
        return self


# PEP 508 distribution names and PEP 440 public versions (with an optional local part): neither
# can start with '-', so no pin is ever read by pip as an option.
_PACKAGE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"v?(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?",
                      re.IGNORECASE)


def _package_name(value: str) -> str:
    if not _PACKAGE.fullmatch(value):
        raise PydanticCustomError("bad_package", "a package name is letters, digits, '.', '_' or '-' (PEP 508), "
                                  "starting and ending with a letter or digit; e.g. 'onnxruntime'")
    return value


def _package_version(value: str) -> str:
    if not _VERSION.fullmatch(value):
        raise PydanticCustomError("bad_version", "give one exact version (PEP 440), e.g. '1.26.4'; "
                                  "no specifiers, spaces or pip options")
    return value


def _no_credentials(value: str) -> str:
    """A URL field: http(s) or file, and never 'user:password@' (it would be copied into every manifest)."""
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise PydanticCustomError(
            "url_credentials", "credentials in a URL are copied into every release's manifest; remove "
            "'user:password@' and put them in a netrc file on the device (~/.netrc: machine HOST login USER "
            "password ...) or its keyring")
    if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
        raise PydanticCustomError("bad_url", "give an http(s):// or file:// URL")
    return value


Url = Annotated[str, AfterValidator(_no_credentials)]


class RuntimeSpec(_Strict):
    """The device's runtime environment, used by provisioning and checked before a deploy."""

    python: str = Field(">=3.9", description="version specifier for the device's python")
    packages: dict[Annotated[str, AfterValidator(_package_name)], Annotated[str, AfterValidator(_package_version)]] = \
        Field(default_factory=dict, description="pip name -> exact version")
    index_url: Url | None = Field(None, description="package index for provisioning; no credentials "
                                                    "(use ~/.netrc or a keyring on the device)")


# Backend options: one schema per registered backend (tests check the keys equal the registry's).
# Everything here is copied into the release manifest, on the host and on every device, so the
# schemas are closed: an unknown key (a password, say) is refused, never shipped.
def _layer_name(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # [4] means module "4"


LayerNames = list[Annotated[str, BeforeValidator(_layer_name)]]


class OnnxRuntimeOptions(_Strict):
    optimize_on_device: StrictBool = Field(False, description="save the session's fully optimised model on the "
                                                              "device for its CPU, and load it from there")


class TfliteOptions(_Strict):
    int8_io: StrictBool = Field(False, description="int8: keep the model's native int8 input/output tensors")
    channels_last_io: StrictBool = Field(False, description="an NHWC input for an NCHW model (no leading TRANSPOSE)")
    observer: Literal["minmax", "histogram"] = Field("minmax", description="int8 activation observer")
    float_layers: LayerNames = Field(default_factory=list, description="PyTorch module names kept float at int8")


class NcnnOptions(_Strict):
    float_layers: LayerNames = Field(default_factory=list, description="ncnn layer names kept float at int8")
    int8_depthwise: Literal["auto", "int8", "float"] = Field(
        "auto", description="int8: depthwise convs in int8, in float, or auto (x86_64 targets: float except 3x3 "
                            "stride 2, where ncnn's x86 int8 depthwise kernel is slower than fp32; int8 elsewhere)")


class BatchProfile(_Strict):
    """TensorRT optimisation profile of the batch dimension."""

    min: int = Field(..., ge=1)
    opt: int = Field(..., ge=1)
    max: int = Field(..., ge=1, le=65_536)

    @model_validator(mode="after")
    def _ordered(self) -> "BatchProfile":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max (got {self.min}, {self.opt}, {self.max})")
        return self


class TensorRTOptions(_Strict):
    workspace_mb: int | None = Field(None, gt=0, le=1 << 20, description="builder workspace memory pool, MiB")
    dla_core: int | None = Field(None, ge=0, le=15, description="run on this DLA core (Jetson), GPU fallback on")
    profile: BatchProfile | None = Field(None, description="dynamic batch: {min, opt, max}")


BACKEND_OPTIONS: dict[str, type[_Strict]] = {
    "onnxruntime": OnnxRuntimeOptions, "tflite": TfliteOptions, "ncnn": NcnnOptions, "tensorrt": TensorRTOptions,
}


def _option_problem(backend: str, schema: type[_Strict], err: dict[str, Any]) -> PydanticCustomError:
    """A typed error whose context names the option, so _describe_error can put it in the field."""
    option = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        if _SECRET_KEYS.search(option):
            text = ("secrets do not belong in target files (options are copied into every release's manifest); "
                    "read them on the device from a file or keyring instead")
        else:
            allowed = ", ".join(schema.model_fields) or "none"
            text = f"unknown option for {backend}; allowed: {allowed}"
    else:
        text = _error_text(err)
    return PydanticCustomError("backend_option", "{text}", {"option": option, "text": text})


class BuildSpec(_Strict):
    backend: str
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32", "int8"], min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="per backend: see BACKEND_OPTIONS "
                                                                      "(tensorrt: workspace_mb, dla_core, profile)")

    @field_validator("backend")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; choose one of {', '.join(BACKENDS)}")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the backend's schema; stays a plain dict (backends read it with .get)."""
        backend = info.data.get("backend")
        schema = BACKEND_OPTIONS.get(backend) if isinstance(backend, str) else None
        if schema is None:
            return v  # the backend's own error is the one reported
        try:
            return schema.model_validate(v).model_dump(exclude_unset=True)
        except ValidationError as exc:
            raise _option_problem(backend, schema, exc.errors()[0]) from None


class Limits(_Strict):
    max_accuracy_drop_pp: float | None = Field(None, ge=0, description="overrides the spec's budget if tighter")
    max_latency_p90_ms: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)
    max_artifact_mb: float | None = Field(None, gt=0)
    max_latency_regression_pct: float = Field(10.0, gt=0, description="the nightly flags a run whose p50 is this much "
                                                                     "slower than its baseline's or last good run's, "
                                                                     "when Mann-Whitney on the raw timings agrees")


class Hardware(_Strict):
    """What the board is. Informational, recorded in the manifest, used for power estimates."""

    cpu: str | None = None
    cores: int | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    accelerator: str | None = None
    tdp_w: float | None = Field(None, gt=0, description="typical board power under load, watts")
    l4t: str | None = Field(None, description="Jetson: expected L4T release")


class TargetSpec(_Strict):
    name: SafeName
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


def _error_loc(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, str) or not p.startswith("function-"))
    if err.get("type") == "backend_option":  # the option's own place inside builds[].options
        loc = f"{loc}.{err['ctx']['option']}" if err["ctx"]["option"] else loc
    return loc.replace(".[key]", "")


# Errors whose input is never echoed: it may be the secret the error is about.
_SILENT_INPUT = ("url_credentials", "backend_option")


def _error_text(err: dict[str, Any]) -> str:
    """What is wrong and how to fix it, without the field's name."""
    kind = err.get("type", "")
    msg = err.get("msg", "invalid")
    got = err.get("input")
    if kind == "extra_forbidden":
        if _SECRET_KEYS.search(str(err["loc"][-1])):
            return "secrets do not belong in target files; use an SSH key (key_file) or ssh-agent instead"
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    msg = msg.removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    if kind.startswith("union_tag") or kind in _SILENT_INPUT:
        return msg
    if kind == "finite_number":
        msg = "give a finite number (.inf and .nan are not settings)"
    if got is not None and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return msg


def _describe_error(err: dict[str, Any]) -> str:
    loc = _error_loc(err)
    text = _error_text(err)
    return f"field '{loc}': {text}" if loc else text


def _validation_message(path: Path, exc: ValidationError) -> str:
    """Every error of the file on one line, so one run shows all there is to fix."""
    described = list(dict.fromkeys(_describe_error(e) for e in exc.errors()))
    count = f"{len(described)} errors: " if len(described) > 1 else ""
    return f"{path}: {count}{'; '.join(described)}"


# --------------------------------------------------------------------------------------------
# YAML with limits: specs and targets are small, hand-written files
# --------------------------------------------------------------------------------------------

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 50
MAX_YAML_VALUES = 100_000
"""Caps on a spec or target file: its size, how deep it nests, and how many values it holds once
aliases are expanded (a "billion laughs" file is a few hundred bytes of aliases)."""


class _YamlRefused(yaml.MarkedYAMLError):
    """A YAML document edgeship will not read; ``fix`` says what to do instead."""

    def __init__(self, problem: str, mark: Any, fix: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and documents nested deeper than MAX_YAML_DEPTH."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: refuse before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlRefused(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark,
                                   "flatten the structure")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges may be overridden: that is what they are for
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    continue  # complex keys are refused by validation, not here
                if key in first:
                    raise _YamlRefused(f"duplicate key {key!r} (first at line {first[key].line + 1})",
                                       key_node.start_mark, "remove one of them")
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Any) -> None:
    """Refuse a document whose aliases expand past MAX_YAML_VALUES values or MAX_YAML_DEPTH levels.

    PyYAML shares an aliased node instead of copying it, so loading is cheap; whatever walks the
    result later (validation, the manifest's JSON) pays for every expansion. Sizes are counted per
    node once (iteratively: an alias chain may be deeper than Python's recursion limit), which also
    finds an alias that refers to its own node.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_VALUES or depth[key] > MAX_YAML_DEPTH:
                limit = (f"more than {MAX_YAML_VALUES:,} values" if size[key] > MAX_YAML_VALUES
                         else f"more than {MAX_YAML_DEPTH} levels")
                raise _YamlRefused(f"aliases expand to {limit}", node.start_mark,
                                   "write the values out or use fewer aliases")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise _YamlRefused("an alias refers to the node that contains it", node.start_mark, "remove the alias")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _decode(path: Path, raw: bytes) -> str:
    if len(raw) > MAX_YAML_BYTES:
        raise SpecError(f"{path}: {len(raw) / 2**20:.1f} MiB is more than the {MAX_YAML_BYTES >> 20} MiB a spec "
                        "or target may have; keep data in data files and name them in the spec")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a BOM some editors write
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                        "save the file as UTF-8") from None


def _parse_yaml(text: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"{path}: {what} file not found; check the path")
    text = _decode(path, path.read_bytes())
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        fix = getattr(exc, "fix", "fix the YAML syntax")
        raise SpecError(f"{path}:{where}: {problem}; {fix}") from None
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
        if isinstance(src, ImageFolderSource):
            checks.append((f"{section}.source.classes_file", src.classes_file))
    missing = [f"field '{field}': file {value!r} not found" for field, value in checks
               if value and not spec.resolve_path(value).exists()]
    if missing:
        raise SpecError(f"{path}: {'; '.join(missing)}; paths are relative to the spec file "
                        f"({path.resolve().parent})")


def check_spec_for_target(spec: PipelineSpec, target: TargetSpec) -> None:
    """What a spec and a target cannot do together, refused before any work starts (exit 2)."""
    if spec.model.onnx:
        torch_only = [b.backend for b in target.builds if b.backend in NEEDS_PYTORCH]
        if torch_only:
            raise SpecError(
                f"{spec.source_path}: field 'model.onnx': backend {torch_only[0]!r} of target {target.name} "
                f"({target.source_path}) converts from the PyTorch module, not from ONNX; give model.factory "
                "(or model.exported) instead, or use a target without it (copy the target file and edit builds)")


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


def _is_path(ref: str) -> bool:
    return Path(ref).suffix in (".yaml", ".yml") or "/" in ref or os.sep in ref


def find_target_file(name_or_path: str) -> Path:
    """A target by file path, or by name in :func:`target_dirs` (announced when not built in)."""
    if _is_path(name_or_path):
        candidate = Path(os.path.expanduser(name_or_path))
        if candidate.is_file():
            return candidate
        raise SpecError(f"{candidate}: target file not found; check the path")
    for d in target_dirs():
        for ext in (".yaml", ".yml"):
            p = d / f"{name_or_path}{ext}"
            if p.is_file():
                _announce(name_or_path, p)
                return p
    known = ", ".join(sorted(list_target_names())) or "none"
    raise SpecError(f"target {name_or_path!r} not found in {', '.join(str(d) for d in target_dirs())}; "
                    f"known targets: {known}")


_ANNOUNCED: set[Path] = set()


def _announce(name: str, path: Path) -> None:
    """Say on stderr which file a target name found when it is not the built-in one (once per file).

    A targets/ folder in the working directory comes before the built-in targets; without this
    line a stray ./targets/rpi4.yaml would silently change what every build for rpi4 does.
    """
    builtin_dir = project_root() / "targets"
    if path.resolve().parent == builtin_dir.resolve() or path.resolve() in _ANNOUNCED:
        return
    _ANNOUNCED.add(path.resolve())
    shadowed = [builtin_dir / f"{name}{ext}" for ext in (".yaml", ".yml") if (builtin_dir / f"{name}{ext}").is_file()]
    also = f" (shadows the built-in {shadowed[0]})" if shadowed else ""
    print(f"edgeship: target {name}: using {path}{also}", file=sys.stderr)


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


MAX_EXTENDS = 16
"""Longest ``extends:`` chain (a board extends a family extends a base: three is typical)."""


def _parent_file(ref: str, child: Path) -> Path:
    """``extends: ref`` of ``child``: a path is relative to ``child``'s folder, a name uses the search path."""
    if not _is_path(ref):
        return find_target_file(ref)
    parent = Path(os.path.expanduser(ref))
    if not parent.is_absolute():
        parent = child.parent / parent
    if not parent.is_file():
        raise SpecError(f"{parent}: target file not found; a path in 'extends' is relative to {child.parent.resolve()}")
    return parent


def _extends_chain(name_or_path: str) -> list[tuple[Path, dict[str, Any]]]:
    """The target file and every file it extends, child first (iterative: chains are capped, not recursed)."""
    path = find_target_file(name_or_path)
    chain = [(path, _read_yaml(path, "target"))]
    seen = [path.resolve()]
    while (ref := chain[-1][1].get("extends")) is not None:
        child = chain[-1][0]
        if not isinstance(ref, str):
            raise SpecError(f"{child}: field 'extends': expected a target name or file, got {ref!r}")
        if len(chain) >= MAX_EXTENDS:
            links = " -> ".join(p.stem for p, _ in chain[:4])
            raise SpecError(f"{path}: field 'extends': a chain of more than {MAX_EXTENDS} targets ({links} -> ...); "
                            "extend a target that holds the shared fields directly")
        try:
            parent = _parent_file(ref, child)
            if parent.resolve() in seen:
                cycle = " -> ".join(p.stem for p in (*seen, parent.resolve()))
                raise SpecError(f"{child}: field 'extends': cycle {cycle}; remove one of the links")
            chain.append((parent, _read_yaml(parent, "target")))
        except SpecError as exc:
            if str(exc).startswith(f"{child}: field 'extends'"):
                raise
            raise SpecError(f"{child}: field 'extends': {exc}") from None
        seen.append(parent.resolve())
    return chain


def resolve_target_data(name_or_path: str) -> tuple[dict[str, Any], Path]:
    """Read a target and everything it ``extends:``, merged child-over-parent (unvalidated)."""
    chain = _extends_chain(name_or_path)
    merged: dict[str, Any] = {}
    for _, data in reversed(chain):
        merged = _deep_merge(merged, {k: v for k, v in data.items() if k != "extends"})
    path, own = chain[0]
    if "extends" in own:
        merged["extends"] = own["extends"]
    # A child never inherits its parent's name.
    merged["name"] = own.get("name", path.stem)
    return merged, path


def effective_validation(spec: PipelineSpec, target: TargetSpec) -> ValidationSpec:
    """The validation settings a deploy uses: the target's, with each field the spec sets on top.

    Field by field, not block by block: a spec that sets ``warmup`` and ``runs`` for its model
    used to hide the whole target block, so an emulated device's ``samples`` limit (and a bench
    target's ``rounds``) was silently ignored.
    """
    if spec.validation is None:
        return target.validation
    merged = target.validation.model_dump()
    merged.update({k: getattr(spec.validation, k) for k in spec.validation.model_fields_set})
    return ValidationSpec.model_validate(merged)


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
