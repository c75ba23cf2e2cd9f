"""Release decisions do not depend on the device's clock (issue 11, reliability checklist).

On the emulated x86 device, the release store's operations, the lock holder and the agent run
under libfaketime (Debian's ``faketime``) a year ahead or behind for part of a deploy sequence.
Which releases are kept, which one is current and where a rollback goes must come out exactly as
with a correct clock: decisions follow content and the order of switches, never timestamps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.spec import load_target
from pipeline.transport import open_transport
from tests.transport.helpers import SPEC, make_release

pytestmark = [pytest.mark.device, pytest.mark.slow]
YEAR = 365 * 86400
CLOCKS = {"ahead": "+365d", "behind": "-365d", "now": "+0d"}
VENV_PYTHON = "/opt/edgeship/venv/bin/python"


@pytest.mark.parametrize("schedule", [
    ["ahead", "ahead", "now", "now", "now"],        # booted with a clock a year ahead, then NTP fixed it
    ["now", "now", "behind", "behind", "behind"],   # the RTC battery died: a year behind from then on
])
def test_a_year_of_clock_skew_changes_no_decision(schedule: list[str], sim_workspace: Path, tmp_path: Path) -> None:
    target = load_target("e2e-sim-x86")
    base = f"/opt/edgeship-skew-{os.getpid()}-{schedule[0]}"
    target.transport.root = f"{base}/store"
    target.transport.keep_releases = 1
    with open_transport(target) as t:
        for tag, offset in CLOCKS.items():  # an interpreter per clock, the same venv behind each
            wrapper = f"{base}/{tag}/bin/python"
            r = t.executor.run(f"mkdir -p {base}/{tag}/bin && printf '#!/bin/sh\\nexec faketime -f \"{offset}\" "
                               f"{VENV_PYTHON} \"$@\"\\n' > {wrapper} && chmod +x {wrapper}", 30)
            assert r.rc == 0, r.err
    try:
        for i, tag in enumerate(schedule, 1):
            target.transport.python = f"{base}/{tag}/bin/python"
            with open_transport(target) as t:
                t.deploy(make_release(tmp_path / f"r{i}", f"r{i}", 4096), f"r{i}")
                assert t.run_agent(["probe"], timeout_s=120)["arch"] == "x86_64"  # the agent, skewed
                history = t.executor.get(f"{target.transport.root}/{SPEC}/history", 30).decode().split()
        # The switches really ran under the skewed clocks (the history records the device's time).
        stamps = [float(x) for x in history[0::2]]
        for stamp, tag in zip(stamps, schedule):
            expected = time.time() + {"ahead": YEAR, "behind": -YEAR, "now": 0}[tag]
            assert abs(stamp - expected) < 3600, (tag, stamp, expected)

        with open_transport(target) as t:
            # keep_releases=1: the current one and the one current before it, by the order of switches.
            assert t.releases() == ["r4", "r5"] and t.current() == "r5"
            assert t.rollback() == "r4"
            assert t.rollback() == "r5"
    finally:
        target.transport.python = VENV_PYTHON
        with open_transport(target) as t:
            t.executor.run(f"rm -rf {base}", 60)
