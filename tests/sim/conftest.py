"""Make ``sim_devices`` available here without a second copy when the root conftest has it.

pytest forbids ``pytest_plugins`` outside the root conftest, so this registers the fixtures
module as a plugin itself unless the root conftest already did.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # `pipeline` and `tests` import from the checkout


def pytest_configure(config: pytest.Config) -> None:
    """Register ``tests.sim.fixtures`` once."""
    if not config.pluginmanager.has_plugin("tests.sim.fixtures"):
        config.pluginmanager.import_plugin("tests.sim.fixtures")
