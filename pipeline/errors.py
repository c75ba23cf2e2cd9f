"""Typed errors. Library code raises these; only the CLI maps them to exit codes and one line."""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base class: every error a user can act on. ``str(err)`` is one line saying what and how to fix."""

    exit_code = 1


class SpecError(EdgeshipError):
    """A pipeline spec or target file is invalid (names the file, the field and what is expected)."""

    exit_code = 2


class BackendUnavailable(EdgeshipError):
    """A target lists a backend whose converter or runtime is missing on this host."""

    exit_code = 2


class ConversionError(EdgeshipError):
    """Export, optimization, quantization or conversion failed, or its numeric check did."""


class DeviceError(EdgeshipError):
    """Talking to a device failed: connection, host key, timeout, disk, lock, remote command."""


class AccuracyRegression(EdgeshipError):
    """The gate failed: accuracy, latency or memory outside the target's limits."""

    exit_code = 3
