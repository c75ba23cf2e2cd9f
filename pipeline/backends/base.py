"""What every backend provides, and the typed values that flow through a build.

A backend turns the optimized fp32 ONNX model (or, for TFLite, the PyTorch model) into the
artifact its runtime loads, at one precision. It never edits its inputs and writes only under
``ctx.workdir``. The device-side half of a backend is its runner in ``pipeline/agent/runners``.

INT8: a backend brings only a *candidate builder* (``CandidateBuilder``), never a search of its
own. ``candidate(method, float_layers) -> Candidate`` builds the INT8 model of one range method
with some layers kept float, in the backend's format (``run(x)`` on dicts name -> array,
``write(workdir)``, ``notes()``); ``rank(method, holdout, reference)`` orders the layers for the
fallback. ``pipeline.backends.calibrate.run_search`` then runs ``calibration.search``: method
choice, fallback, budget and the one report (``SearchReport``, the ``calibration`` block of
``Artifact.info``). The QDQ builder (ONNX Runtime, TensorRT) is ``calibration.api.QdqBuilder``,
ncnn's ``ncnn/quantize.NcnnBuilder``, TFLite's ``tflite/build.Pt2eBuilder``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from calibration.search import Arrays, Candidate, CandidateBuilder, Holdout, Ranking, SearchReport

from pipeline.cache import sha256_file

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from pipeline.spec import BuildSpec, PipelineSpec, TargetSpec


@dataclass
class Samples:
    """Preprocessed samples, stable ids and a content hash.

    ``x``: input name -> (N, *shape[1:]) float32, one entry per model input, in the model's order.
    ``y``: int class indices (N,), a list of N per-sample objects (e.g. detection boxes and
    classes; they stay on the host), or None.
    ``pixels``: input name -> the uint8 pixels its ``x`` was normalised from (image sources): what
    the release ships of that input instead of ``x``.
    """

    x: "Arrays"
    y: "np.ndarray | list[Any] | None"
    ids: list[str]
    sha256: str
    pixels: "dict[str, Pixels]" = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(next(iter(self.x.values()))))

    def single(self, what: str) -> "np.ndarray":
        """The only input's samples, for the routes that take one input (``what`` names the route)."""
        if len(self.x) != 1:
            from pipeline.errors import ConversionError

            raise ConversionError(f"{what} takes a model with one input; this one has {len(self.x)} "
                                  f"({', '.join(self.x)}): build it at fp32 or fp16")
        return next(iter(self.x.values()))

    def class_labels(self) -> "np.ndarray | None":
        """``y`` when it holds class indices (an int array), else None."""
        import numpy as np

        return self.y if isinstance(self.y, np.ndarray) else None

    def head(self, n: int, sha256: str | None = None) -> "Samples":
        """The first ``n`` samples (every input, labels and ids follow)."""
        return Samples({k: v[:n] for k, v in self.x.items()}, None if self.y is None else self.y[:n],
                       self.ids[:n], self.sha256 if sha256 is None else sha256,
                       {k: Pixels(p.values[:n], p.recipe) for k, p in self.pixels.items()})


@dataclass(frozen=True)
class Pixels:
    """uint8 samples (N, H, W, C) and the recipe that normalises them into an input's float32
    samples on the host and on the device (pipeline.agent.evaldata.normalise)."""

    values: "np.ndarray"
    recipe: dict[str, Any]


@dataclass
class BuildContext:
    """Everything a conversion may read. Stages pass typed values, never bare dicts."""

    spec: "PipelineSpec"
    target: "TargetSpec"
    build: "BuildSpec"
    workdir: Path
    """Empty folder owned by this conversion; the artifact's files go here."""
    onnx_fp32: Path
    """Optimized fp32 ONNX model (Conv+BN folded, shapes inferred, simplified)."""
    input_names: list[str]
    """The model's inputs, in order (the ONNX graph's names, the spec's)."""
    output_names: list[str]
    """The model's outputs, in order (the ONNX graph's names: the spec's or generated)."""
    calibration: Samples
    check: Samples
    """A few real samples for the post-conversion numeric check (from the calibration split)."""
    reference: "Arrays"
    """fp32 ONNX Runtime outputs (name -> array) for ``check.x``: what the converted model is compared against."""
    cache_dir: Path
    torch_model: Callable[[], Any]
    """Returns the eval-mode PyTorch module (for routes that leave from PyTorch, e.g. TFLite)."""
    log: Callable[[str], None] = print

    @property
    def input_name(self) -> str:
        """The first input (the routes that take one: INT8 calibration)."""
        return self.input_names[0]

    @property
    def output_name(self) -> str:
        """The first output."""
        return self.output_names[0]


@dataclass
class Artifact:
    """A converted model, ready to be packaged and shipped."""

    backend: str
    precision: str
    workdir: Path
    files: list[str]
    """File names relative to ``workdir`` that the runner needs (everything shipped)."""
    runner: str
    """Name of the agent runner (pipeline/agent/runners/<runner>.py)."""
    runner_config: dict[str, Any]
    """JSON-able config handed to the runner on the device (file names, tensor names, quant params)."""
    info: dict[str, Any] = field(default_factory=dict)
    """JSON-able conversion report: check numbers, calibration report, layers kept in float."""


class Backend(Protocol):
    """The registry's view of a backend (see pipeline.registry)."""

    name: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """Whether the converter can run on this host, and if not, why (one line, with the fix)."""

    def version(self) -> dict[str, str]:
        """Versions of the tools the conversion uses, recorded in the manifest and cache keys."""

    def convert(self, ctx: BuildContext, precision: str) -> Artifact:
        """Build the artifact for ``precision`` under ``ctx.workdir``; raise ConversionError on failure."""

    def device_build(self, options: dict[str, Any]) -> bool:
        """Whether a build with these ``builds[].options`` is finished ON the device.

        Then ``convert`` writes what the host can make (the ONNX model, calibration results) and
        a ``device_build`` block in the runner config (:func:`device_build_config`); the agent's
        prepare step builds the runtime's artifact there, before anything is timed, and caches it
        under ``$EDGESHIP_DEVICE_ROOT/engines``. Such a backend's ``available()`` speaks only for
        the host's half: the device's runtime is checked on the device.
        """


__all__ = ["Artifact", "Backend", "BuildContext", "Candidate", "CandidateBuilder", "Holdout", "Ranking", "Samples",
           "SearchReport", "device_build_config", "installed_versions", "missing_packages"]


def device_build_config(onnx: Path, artifact: str, options: dict[str, Any]) -> dict[str, Any]:
    """The runner config's ``device_build`` block: what the agent's prepare step builds from.

    ``onnx_sha256`` is the shipped model's digest (the release's own integrity check covers the
    file); with the device's runtime version and hardware it keys the engine cache on the device.
    """
    return {"onnx_sha256": sha256_file(onnx), "artifact": artifact, "options": dict(options)}


def missing_packages(needed: dict[str, str]) -> list[str]:
    """The pip names of ``needed`` (import name -> pip name) that are not installed (nothing imported)."""
    return [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]


def installed_versions(dists: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed version per distribution name; absent ones are left out (nothing imported)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
