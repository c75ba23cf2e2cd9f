"""Provisioning over SSH: venv + pinned packages via pip on the device, idempotent (offline index)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from pipeline.errors import DeviceError
from pipeline.spec import TargetSpec
from pipeline.transport import open_transport

pytestmark = pytest.mark.device


def _local_index(folder: Path, name: str, version: str) -> str:
    """A PEP 503 index on disk holding one tiny pure-Python wheel (no registry needed)."""
    mod = name.replace("-", "_")
    whl = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/__init__.py": b"VERSION = '%s'\n" % version.encode(),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgeship-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(c).digest()).rstrip(b'=').decode()},{len(c)}\n"
                     for p, c in files.items()) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl, "w") as zf:
        for p, c in files.items():
            zf.writestr(p, c)
        zf.writestr(f"{info}/RECORD", record)
    page = folder / "simple" / name / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<html><body><a href="../../{whl.name}">{whl.name}</a></body></html>\n')
    return (folder / "simple").as_uri()


def test_provision_creates_pinned_venv_and_is_idempotent(ssh_target: Callable[..., TargetSpec], tmp_path: Path) -> None:
    target = ssh_target(python=str(tmp_path / "rt" / "venv" / "bin" / "python"), command_timeout_s=180)
    target.runtime.packages = {"edgeship-dummy-rt": "1.0"}
    target.runtime.index_url = _local_index(tmp_path / "index", "edgeship-dummy-rt", "1.0")
    with open_transport(target) as t:
        with pytest.raises(DeviceError, match=r"no runtime environment at .*/rt/venv/bin/python; run "
                                              r"`edgeship devices provision test-ssh`"):
            t.check(target, t.probe())
        first = t.provision(target)
        assert first["changed"] and first["packages"] == {"edgeship-dummy-rt": "1.0"}
        probe = t.probe()
        assert probe["python_executable"] == target.transport.python
        t.check(target, probe)
        assert t.provision(target)["changed"] is False  # nothing to do the second time

        wrong = target.model_copy(deep=True)
        wrong.runtime.packages = {"edgeship-dummy-rt": "2.0"}
        with pytest.raises(DeviceError, match=r"edgeship-dummy-rt 1.0 \(want 2.0\); run `edgeship devices provision"):
            t.check(wrong, probe)
        with pytest.raises(DeviceError, match="pip install into .* failed"):
            t.provision(wrong)  # 2.0 is not in the index: pip's own error, one line
