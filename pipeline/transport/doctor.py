"""``edgeship devices doctor TARGET``: the agent's checks (pipeline/agent/doctor.py) run on a board.

A board is often checked before anything was ever deployed there, so the agent travels with the
command: zipped, uploaded into a fresh temporary folder on the device, run from the zip with the
runtime interpreter (``python -m edgeship_agent doctor``) and removed again. Nothing is left on the
device. (Uploaded, not piped to stdin: the SSH library feeds a non-terminal stdin one byte per
tick, minutes for the agent.)
"""

from __future__ import annotations

import io
import json
import tempfile
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
    timeout = t.target.transport.command_timeout_s
    made = t.executor.run("mktemp -d", 60)
    folder = made.out.strip()
    if made.rc != 0 or not folder.startswith("/"):
        raise DeviceError(f"{t.executor.name}: cannot make a temporary folder for the doctor: {made.tail()}")
    try:
        with tempfile.NamedTemporaryFile(suffix=".zip") as local:
            local.write(agent_zip())
            local.flush()
            t.executor.put(Path(local.name), f"{folder}/agent.zip", timeout)
        py = t.agent_python
        r = t.executor.run(f"if [ -x {q(py)} ]; then P={q(py)}; else P=$(command -v python3); fi && "
                           f"EDGESHIP_DEVICE_ROOT={q(t.root)} PYTHONPATH={q(folder + '/agent.zip')} "
                           "\"$P\" -m edgeship_agent doctor", timeout)
    finally:
        t.executor.run(f"rm -rf {q(folder)}", 60)
    lines = r.out.strip().splitlines()
    if r.rc != 0 or not lines:
        raise DeviceError(f"{t.executor.name}: doctor failed (exit {r.rc}): {r.tail(2)}")
    try:
        return dict(json.loads(lines[-1]))
    except ValueError:
        raise DeviceError(f"{t.executor.name}: doctor printed no JSON (last line: {lines[-1][:120]!r})") from None
