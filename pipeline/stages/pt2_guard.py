"""Load a ``torch.export`` ``.pt2`` file without letting it run code.

``torch.export.load`` is not safe on untrusted files (its own docs say so). In torch 2.13 a
``.pt2`` can run code when it is loaded or when its module is built or called, through:

- pickles: weights and constants marked ``use_pickle`` (``torch.load(weights_only=False)``),
  ``custom_obj_`` / ``opaque_obj_`` constants (``pickle.loads``), the sample inputs (torch retries
  with ``weights_only=False`` when the safe load fails) and the legacy zip layout;
- AOTInductor members (compiled shared libraries, loaded by ``load_pt2``);
- ``guards_code`` (Python source that ``ExportedProgram.module()`` passes to ``exec``);
- symbolic expressions (``expr_str``, parsed with ``sympy.sympify``, which calls ``eval``);
- graph node targets, resolved by attribute walk from ``torch`` (``torch.os.system`` resolves),
  and called when the module runs.

So edgeship accepts only the members ``torch.export.save`` writes for a plain program, checks each
of the above in the member's serialized form (zip and JSON, nothing unpickled), and then loads
from the same bytes with every ``torch.load`` forced to ``weights_only``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import InputFileError

# Members written by torch.export.save for a program without custom objects (relative to the
# archive's root folder). Anything else (data/aotinductor/, legacy *.pt, xl weights) is refused.
_ALLOWED_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+)")
# Graph ops: registered operators of these namespaces (kernels, not Python found by name).
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims|quantized_decomposed|higher_order)\.\w+(\.\w+)?")
# Names a symbolic expression may use: symbols (s0, u3, ...), sympy constructors, assumptions.
_SYMBOL = re.compile(r"[a-z]+\d+")
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs Mod Eq Ne Lt Le Gt Ge And Or Not True False "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality Piecewise floor ceiling "
    "sqrt oo zoo nan None".split())
_MAX_METADATA = 256 * 2**20  # JSON, sample inputs, extra files: read into memory whole
FIX = "export it again with torch.export.save from a model you trust, or give model.factory"


def load_exported_program(path: Path, field: str = "model.exported") -> Any:
    """The ExportedProgram in ``path``, after :func:`check_pt2`; InputFileError if refused."""
    import torch

    data = _read(path, field)
    check_pt2(data, path, field)
    try:
        with forced_weights_only():
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # corrupt or from another torch: one line, not a traceback
        raise _refuse(path, field, f"cannot load it ({type(exc).__name__}: {_first_line(exc)})") from None


def check_pt2(data: bytes, path: Path, field: str = "model.exported") -> None:
    """Raise InputFileError unless the archive holds only data torch loads without running code."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = _members(zf, path, field)
            for rel in members:
                if not _ALLOWED_MEMBERS.fullmatch(rel):
                    raise _refuse(path, field, f"member {rel!r} is not part of a plain torch.export archive "
                                               "(compiled code, pickles or a legacy layout)")
            for rel, info in members.items():
                if info.file_size > _MAX_METADATA and not rel.startswith("data/weights/weight_") \
                        and not rel.startswith("data/constants/tensor_"):
                    raise _refuse(path, field, f"member {rel!r} unpacks to {info.file_size} bytes, more than "
                                               f"{_MAX_METADATA} for metadata (a zip bomb?)")
                _check_member(rel, zf.read(info), path, field)
    except zipfile.BadZipFile as exc:
        raise _refuse(path, field, f"not a .pt2 (zip) archive: {exc}") from None
    if not any(rel.startswith("models/") for rel in members):
        raise _refuse(path, field, "no models/*.json in the archive; not written by torch.export.save")


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` in the block uses the safe unpickler, even where a caller asks otherwise."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _read(path: Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _refuse(path, field, f"cannot read it ({exc.strerror or exc})") from None


def _members(zf: zipfile.ZipFile, path: Path, field: str) -> dict[str, zipfile.ZipInfo]:
    """Members by name relative to the single root folder; duplicates refused (readers differ on them)."""
    infos = zf.infolist()
    root = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if not info.filename.startswith(root) or info.filename[len(root):] in members:
            raise _refuse(path, field, f"member {info.filename!r} is duplicated or outside the archive's "
                                       "root folder")
        members[info.filename[len(root):]] = info
    return members


def _check_member(rel: str, raw: bytes, path: Path, field: str) -> None:
    if rel.endswith("_config.json"):
        _check_payload_config(rel, _json(rel, raw, path, field), path, field)
    elif rel.startswith("models/"):
        _check_program(rel, _json(rel, raw, path, field), path, field)
    elif rel.startswith("data/sample_inputs/"):
        _check_sample_inputs(rel, raw, path, field)


def _json(rel: str, raw: bytes, path: Path, field: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(path, field, f"member {rel!r} is not valid JSON ({exc})") from None


def _check_payload_config(rel: str, cfg: Any, path: Path, field: str) -> None:
    """Weights and constants must be raw tensor bytes, never pickles or custom objects."""
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, field, f"member {rel!r} has no 'config' mapping")
    for fqn, meta in entries.items():
        name = meta.get("path_name", "") if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False \
                or not re.fullmatch(r"(weight|tensor)_\d+", str(name)):
            raise _refuse(path, field, f"{rel!r} stores {fqn!r} as a pickle or custom object "
                                       f"({name or 'no path'}), which would run code when loaded")


def _check_program(rel: str, program: Any, path: Path, field: str) -> None:
    """No guard code, only registered operators as node targets, only plain symbolic expressions."""
    if not isinstance(program, dict):
        raise _refuse(path, field, f"member {rel!r} is not a serialized ExportedProgram")
    if program.get("guards_code"):
        raise _refuse(path, field, f"{rel!r} carries guards_code (Python source run by torch on load)")
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str) and not _allowed_target(value):
            raise _refuse(path, field, f"{rel!r} calls {value!r}, which is not a registered operator")
        if key == "expr_str" and isinstance(value, str) and not _plain_expr(value):
            raise _refuse(path, field, f"{rel!r} has a symbolic expression that is not plain arithmetic: "
                                       f"{value[:60]!r}")


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in nested JSON (dicts and lists), depth first."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                yield k, v
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _allowed_target(target: str) -> bool:
    from torch._export.serde.serialize import _SYM_OPS

    return bool(_OP_TARGET.fullmatch(target)) or target in {f"{op.__module__}.{op.__name__}" for op in _SYM_OPS}


def _plain_expr(expr: str) -> bool:
    """sympify evaluates its text: allow only known names, no attribute access, no dunders."""
    from torch.utils._sympy import functions

    if "__" in expr or re.search(r"\.\s*[A-Za-z_]", expr) or re.search(r"[;\[\]{}\\@`]|lambda", expr):
        return False
    allowed = _SYMPY_NAMES | set(functions.__all__) | _assumption_names()
    text = re.sub(r"'[a-z]+\d+'", "", expr)  # Symbol('s31', ...): the quoted symbol name
    return "'" not in text and '"' not in text and all(
        name in allowed or _SYMBOL.fullmatch(name) for name in re.findall(r"[A-Za-z_]\w*", text))


def _assumption_names() -> set[str]:
    from sympy.core.assumptions import _assume_defined

    return set(_assume_defined)


def _check_sample_inputs(rel: str, raw: bytes, path: Path, field: str) -> None:
    """Sample inputs are always a torch.save pickle: they must load with the safe unpickler."""
    import torch

    if not raw:
        return
    try:
        torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError names the refused global
        raise _refuse(path, field, f"{rel!r} is a pickle that needs more than tensors to load "
                                   f"({_first_line(exc)[:120]})") from None


def _refuse(path: Path, field: str, reason: str) -> InputFileError:
    return InputFileError(f"{path}: field '{field}': refused: {reason}; {FIX}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
