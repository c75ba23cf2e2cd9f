"""Typed errors. Library code raises these; only the CLI maps them to exit codes and one line.

Exit codes (shared/decisions.md): 0 every run passed; 3 a gate failed; 2 bad input (a spec,
target, model file or data file that is wrong or hostile, usage errors); 1 an environment failure
(disk full, network, a device that does not answer, user code that raises); 130 interrupted.
"""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base class: every error a user can act on. ``str(err)`` is one line saying what and how to fix."""

    exit_code = 1


class BadInput(EdgeshipError):
    """Something the user handed us is wrong or hostile: names the file, the field and the fix."""

    exit_code = 2


class SpecError(BadInput):
    """A pipeline spec or target file is invalid (names the file, the field and what is expected)."""


class InputFileError(BadInput):
    """A model or data file is corrupt, hostile or does not fit the spec (untrusted input)."""


class BackendUnavailable(EdgeshipError):
    """A target lists a backend whose converter or runtime is missing on this host."""

    exit_code = 2


class ConversionError(EdgeshipError):
    """Export, optimization, quantization or conversion failed, or its numeric check did."""


class UserCodeError(EdgeshipError):
    """A factory, data callable or metric named by the spec raised (environment failure, exit 1)."""


class DeviceError(EdgeshipError):
    """Talking to a device failed: connection, host key, timeout, disk, lock, remote command."""


class AccuracyRegression(EdgeshipError):
    """The gate failed: accuracy, latency or memory outside the target's limits."""

    exit_code = 3


class Interrupted(EdgeshipError):
    """Ctrl-C or SIGTERM: the run stopped after restoring what it had changed (exit 130)."""

    exit_code = 130
