"""Calibration options, the method names, and one fallback layer of the report (calibration.search)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from calibration.errors import CalibrationConfigError

#: the range observers (calibration.observers); "auto" tries every one on the holdout
METHODS = ("minmax", "percentile", "entropy", "mse")
METHOD_CHOICES = ("auto", *METHODS)
TARGETS = ("onnxruntime", "tensorrt")
#: cross-layer equalisation (calibration.equalize): never, always, or scored beside the plain graph
EQUALIZE_CHOICES = ("off", "on", "auto")
#: the method-name suffix of a candidate calibrated on the equalised graph ("entropy+cle")
CLE_SUFFIX = "+cle"
#: learned weight rounding (calibration.adaround): never, always, or scored beside nearest rounding
ADAROUND_CHOICES = ("off", "on", "auto")
#: the method-name suffix of a plan whose weight rounding AdaRound learned ("entropy+ada"; before
#: "+cle": "entropy+ada+cle" is AdaRound on the equalised graph)
ADA_SUFFIX = "+ada"


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate.

    Attributes:
        method: range observer, or "auto" to score all on the holdout and keep the best.
        percentile: percentile of |x| kept by the "percentile" observer.
        activation_mode: "symmetric" (int8, zero point 0) or "asymmetric" (uint8; a
            non-negative tensor gets zero point 0). None picks per target: asymmetric for
            onnxruntime (U8S8 kernels are the fast path on x86/ARM CPUs), symmetric for TensorRT
            (its explicit quantization requires it).
        per_channel: weights per output channel (else per tensor); always symmetric int8.
        holdout_fraction: share of the calibration set held out to score methods and fallback.
            Ranges are fitted on the rest. The evaluation set is never used.
        max_drop_pp: accuracy-drop budget on the holdout (percentage points; top-1
            disagreement with fp32 when there are no labels). None: no budget.
        fallback: keep the most sensitive layers in float until the budget is met.
        target: "onnxruntime" or "tensorrt" (TensorRT forces symmetric activations).
        seed: holdout split seed.
        bins: histogram bins per side (|x| resolution), TensorRT uses 2048.
        batch_size: samples per inference call during statistics and scoring.
        threads: onnxruntime intra-op threads (None: its default).
        max_fallback_layers: most layers fallback may keep in float (None: all but one).
        tie_margin: with no labels, a top-1 swap between classes fp32 itself ranks within this
            probability of each other counts as agreement on the holdout (0: strict; see
            :func:`calibration.metrics.top1_agreement`).
        bias_correction: fold the mean output shift of weight rounding into Conv/Gemm biases
            (the written QDQ model carries the corrected biases; see
            :func:`calibration.plan.bias_correction`).
        equalize: cross-layer equalisation before calibration (:mod:`calibration.equalize`):
            "off", "on" (every method on the equalised graph) or "auto" (each method with and
            without; the holdout picks, and a "+cle" method name says the equalised one won).
        equalize_relu6: what equalisation does with Clip(0, 6) between two convolutions:
            "skip" (leave the pair alone; the fp32 function stays exact) or "relu" (replace it
            by Relu, Nagel et al.'s choice; the holdout judges against the original fp32). Not
            the default: fp32 top-1 on the ImageNet sample falls 83.5 -> 82.25 % (MobileNetV2)
            and 86.5 -> 55.75 % (EfficientNet-Lite0, whose weights lean on the clip).
        adaround: learned weight rounding with the plan's scales (:mod:`calibration.adaround`):
            "off", "on" (every method's plan) or "auto" (each method with and without; the
            holdout picks, and a "+ada" method name says the learned rounding won).
        min_sqnr_db: fidelity floor: the fallback keeps layers in float until the holdout's output
            SQNR against fp32 reaches it (None: no floor; see
            :func:`calibration.sensitivity.choose_fallback`).
        close_islands: let ONNX Runtime's layout crossings shape the fallback: take layers in
            the order of output noise removed per unit of estimated time, and afterwards also
            keep in float each int8 run between float layers that costs more in crossings than
            it saves (:mod:`calibration.islands`; target "onnxruntime" only).
    """

    method: str = "auto"
    percentile: float = 99.99
    activation_mode: str | None = None
    per_channel: bool = True
    holdout_fraction: float = 0.2
    max_drop_pp: float | None = None
    fallback: bool = True
    target: str = "onnxruntime"
    seed: int = 0
    bins: int = 2048
    batch_size: int = 16
    threads: int | None = None
    max_fallback_layers: int | None = None
    tie_margin: float = 0.0
    bias_correction: bool = True
    equalize: str = "off"
    equalize_relu6: str = "skip"
    adaround: str = "off"
    min_sqnr_db: float | None = None
    close_islands: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHOD_CHOICES:
            raise CalibrationConfigError(f"method {self.method!r} unknown; choose one of {', '.join(METHOD_CHOICES)}")
        if self.target not in TARGETS:
            raise CalibrationConfigError(f"target {self.target!r} unknown; choose one of {', '.join(TARGETS)}")
        if self.activation_mode not in (None, "symmetric", "asymmetric"):
            raise CalibrationConfigError(
                f"activation_mode {self.activation_mode!r} unknown; choose 'symmetric' or 'asymmetric'"
            )
        if self.target == "tensorrt" and self.activation_mode == "asymmetric":
            raise CalibrationConfigError(
                "TensorRT explicit quantization needs symmetric int8 (zero point 0); "
                "set activation_mode='symmetric' or leave it unset"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise CalibrationConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise CalibrationConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.min_sqnr_db is not None and not 0.0 < self.min_sqnr_db <= 200.0:
            raise CalibrationConfigError(f"min_sqnr_db {self.min_sqnr_db} must be in (0, 200] dB")
        if self.max_drop_pp is not None and self.max_drop_pp < 0:
            raise CalibrationConfigError(f"max_drop_pp must be >= 0, got {self.max_drop_pp}")
        if self.equalize not in EQUALIZE_CHOICES:
            raise CalibrationConfigError(f"equalize {self.equalize!r} unknown; choose one of {', '.join(EQUALIZE_CHOICES)}")
        if self.adaround not in ADAROUND_CHOICES:
            raise CalibrationConfigError(
                f"adaround {self.adaround!r} unknown; choose one of {', '.join(ADAROUND_CHOICES)}")
        if self.equalize_relu6 not in ("relu", "skip"):
            raise CalibrationConfigError(f"equalize_relu6 {self.equalize_relu6!r} unknown; choose 'relu' or 'skip'")
        if self.bins < 256:
            raise CalibrationConfigError(f"bins must be >= 256 (entropy needs room above 128 levels), got {self.bins}")

    @property
    def symmetric(self) -> bool:
        """Whether activations are symmetric int8."""
        if self.activation_mode is None:
            return self.target == "tensorrt"
        return self.activation_mode == "symmetric"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able options."""
        return asdict(self)


def resolve_methods(method: str, equalize: str = "off", adaround: str = "off") -> tuple[str, ...]:
    """The methods a search tries: every observer for "auto", else the one named; with
    ``adaround`` "on" each as "<method>+ada", with "auto" both; then the same for ``equalize``
    and "+cle"."""
    if method not in METHOD_CHOICES:
        raise CalibrationConfigError(f"method {method!r} unknown; choose one of {', '.join(METHOD_CHOICES)}")
    observers = METHODS if method == "auto" else (method,)
    learned = tuple(m + ADA_SUFFIX for m in observers)
    plain = {"off": observers, "on": learned, "auto": observers + learned}[adaround]
    cle = tuple(m + CLE_SUFFIX for m in plain)
    return {"off": plain, "on": cle, "auto": plain + cle}[equalize]


def _split_suffix(method: str, suffix: str) -> tuple[str, bool]:
    return (method[:-len(suffix)], True) if method.endswith(suffix) else (method, False)


def split_adaround(method: str) -> tuple[str, bool]:
    """("entropy", True) for "entropy+ada": the observer and whether AdaRound learns the rounding."""
    return _split_suffix(method, ADA_SUFFIX)


def split_method(method: str) -> tuple[str, bool]:
    """("entropy", True) for "entropy+cle": the observer and whether the graph is equalised."""
    return _split_suffix(method, CLE_SUFFIX)


@dataclass
class FallbackLayer:
    """One layer kept in float by the accuracy-aware fallback.

    Attributes:
        name: node name.
        op: op type.
        sqnr_db: output SQNR (dB) of the model with only this layer quantized (lower = more
            sensitive).
        saved_pp: holdout accuracy (or agreement) points recovered when this layer alone is
            left in float while all others are quantized.
        saved_db: output SQNR gained the same way.
    """

    name: str
    op: str
    sqnr_db: float
    saved_pp: float
    saved_db: float
