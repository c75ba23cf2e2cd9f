"""``edgeship devices doctor TARGET``: the agent's checks (pipeline/agent/doctor.py) run on a board.

A board is often checked before anything was ever deployed there, so the agent travels with the
command: zipped in memory, sent as base64 on stdin, unpacked into a temporary folder on the device,
run there with the runtime interpreter (``python -m edgeship_agent doctor`` from the zip) and
removed again. Nothing is left on the device.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DeviceError
from pipeline.transport.base import q

if TYPE_CHECKING:
    from pipeline.transport.transport import Transport

AGENT = Path(__file__).resolve().parent.parent / "agent"


def agent_zip() -> bytes:
    """The agent package as the release ships it (``edgeship_agent/``), zipped."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(AGENT.rglob("*.py")):
            z.write(path, f"edgeship_agent/{path.relative_to(AGENT).as_posix()}")
    return buf.getvalue()


def run_doctor(t: "Transport") -> dict[str, Any]:
    """``{"host", "checks": [{"check", "ok", "detail"}]}`` from the device, or DeviceError."""
    py = t.agent_python
    cmd = (f"d=$(mktemp -d) && trap 'rm -rf \"$d\"' EXIT && base64 -d > \"$d/agent.zip\" && "
           f"if [ -x {q(py)} ]; then P={q(py)}; else P=$(command -v python3); fi && "
           f"EDGESHIP_DEVICE_ROOT={q(t.root)} PYTHONPATH=\"$d/agent.zip\" \"$P\" -m edgeship_agent doctor")
    r = t.executor.run(cmd, t.target.transport.command_timeout_s, stdin=base64.b64encode(agent_zip()).decode())
    lines = r.out.strip().splitlines()
    if r.rc != 0 or not lines:
        raise DeviceError(f"{t.executor.name}: doctor failed (exit {r.rc}): {r.tail(2)}")
    try:
        return dict(json.loads(lines[-1]))
    except ValueError:
        raise DeviceError(f"{t.executor.name}: doctor printed no JSON (last line: {lines[-1][:120]!r})") from None
