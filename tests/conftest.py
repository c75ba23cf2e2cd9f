"""Shared test setup.

* ``@pytest.mark.backend("name")`` skips a test with the reason the backend's ``available()``
  gives when its converter or runtime is missing here.
* Device and Docker fixtures live with their tests (tests/sim, tests/transport, tests/docker).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
if str(ROOT) not in sys.path:  # so test modules can share helpers as tests.<folder>.helpers
    sys.path.insert(0, str(ROOT))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers(name="backend"):
        from pipeline.registry import get_backend

        name = mark.args[0]
        ok, reason = get_backend(name).available()
        if not ok:
            pytest.skip(f"backend {name} unavailable: {reason}")


@pytest.fixture
def stage_cache(tmp_path: Path):
    """A fresh, empty stage cache (the trained-weights cache stays shared: it is deterministic)."""
    from pipeline.cache import Cache

    return Cache(tmp_path / "cache" / "stages")


@pytest.fixture(scope="session")
def mnist_spec():
    from pipeline.spec import load_spec

    return load_spec(EXAMPLES / "mnist.yaml")


def pytest_configure(config: pytest.Config) -> None:
    # Keep BLAS/ORT from oversubscribing the 2-core CI machine when tests run models.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
