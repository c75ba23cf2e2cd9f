"""Typed errors raised by the calibration library.

The pipeline's CLI maps these to exit codes and prints their message as one line, so every
message names the file or sample at fault and what to do about it.
"""

from __future__ import annotations


class CalibrationError(RuntimeError):
    """Calibration could not be carried out (model, statistics or writer problem)."""


class CalibrationDataError(ValueError):
    """The calibration or evaluation data is unusable (empty, unreadable, misshapen, leaked)."""


class CalibrationConfigError(ValueError):
    """A calibration option is invalid or options contradict each other."""
