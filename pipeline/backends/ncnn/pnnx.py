"""pnnx, the ONNX -> ncnn converter, run as a subprocess inside a scratch folder.

Shared by the fp32/fp16 conversion (convert.py) and the int8 build's second conversion of the
bias-corrected model (quantize.py), so neither imports the other.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.backends.base import BuildContext

PNNX_TIMEOUT_S = 900


def executable() -> Path | None:
    """The pnnx executable inside the pnnx wheel, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = Path(list(spec.submodule_search_locations)[0]) / "pnnx"
    return exe if exe.is_file() else None


def run(ctx: "BuildContext", scratch: Path, fp16: bool, onnx_path: Path | None = None
        ) -> tuple[Path, Path, list[str]]:
    """Run pnnx on (a prepared copy of) the optimized ONNX model inside ``scratch``.

    ``onnx_path`` converts another fp32 ONNX model of the same graph instead (the bias-corrected
    copy for int8).

    pnnx writes its intermediates next to its input, so the input is copied into ``scratch``
    first: the stage never writes outside its workdir.
    """
    from pipeline.backends.ncnn.onnx_prep import fold_identity_gathers

    src = scratch / "model.onnx"
    rewrites = fold_identity_gathers(Path(onnx_path or ctx.onnx_fp32), src)
    # every input's shape, in the model's order: pnnx names their blobs in0, in1, ... in this order
    shapes = ",".join(f"[{','.join(map(str, [1, *i.shape[1:]]))}]" for i in ctx.spec.input_specs())
    param, binf = scratch / "model.ncnn.param", scratch / "model.ncnn.bin"
    cmd = [str(executable()), src.name, f"inputshape={shapes}", f"fp16={int(fp16)}",
           f"ncnnparam={param.name}", f"ncnnbin={binf.name}", "ncnnpy=model_ncnn.py",
           "pnnxparam=model.pnnx.param", "pnnxbin=model.pnnx.bin", "pnnxpy=model_pnnx.py",
           "pnnxonnx=model.pnnx.onnx"]
    try:
        proc = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise ConversionError(f"ncnn: pnnx did not finish within {PNNX_TIMEOUT_S} s") from err
    if proc.returncode != 0 or not param.is_file() or not binf.is_file():
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ConversionError(f"ncnn: pnnx failed (exit {proc.returncode}): {tail[0]}")
    return param, binf, rewrites
