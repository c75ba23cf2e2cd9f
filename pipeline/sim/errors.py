"""Errors raised by the emulated devices. Each ``str()`` is one line saying what and how to fix."""

from __future__ import annotations

from pipeline.errors import DeviceError


class SimError(DeviceError):
    """An emulated device could not be built, started, stopped or queried."""


class SimPrerequisiteError(SimError):
    """Not root, or a host tool (debootstrap, qemu-user-static, ssh-keygen...) is missing."""

    exit_code = 2


class SimBuildError(SimError):
    """Building a rootfs failed (debootstrap, venv, pip)."""


class RegistryUnreachable(SimBuildError):
    """The Debian mirror or the Python package registry could not be reached during a build."""
