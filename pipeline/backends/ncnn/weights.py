"""Walk an ncnn .bin file layer by layer, and write one back.

The .bin is the concatenation of each layer's weight buffers in .param order, with nothing that
says which bytes belong to which layer: only each layer type's ``load_model`` knows what it reads.
This module encodes that knowledge for the layer types pnnx emits for CNNs (from ncnn's
operators reference and layer sources), and refuses any other weighted type instead of
guessing. Two kinds of buffer exist (ncnn ``ModelBin::load(w, type)``):

* tagged (type 0): a 4-byte little-endian tag, then the data, padded to 4 bytes.
  Tag 0 or 0x0002C056: float32; 0x01306B47: float16; 0x000D4B38: int8.
* raw (type 1): ``w`` float32 values, no tag.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pipeline.backends.ncnn.paramfile import Layer, ParamFile

TAG_FP32 = 0x00000000
TAG_FP32_RAW = 0x0002C056
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38

# Layer types that read nothing from the .bin (pnnx output for CNNs and common extras).
WEIGHTLESS = frozenset("""
    Input Split Concat Slice Crop Reshape Flatten Permute Squeeze ExpandDims Padding Pooling
    Pooling1D Pooling3D ReLU ReLU6 Clip Sigmoid Swish HardSigmoid HardSwish Mish TanH ELU GELU
    SELU Softmax LogSoftmax BinaryOp UnaryOp Eltwise Reduction Interp Dropout Noop Cast
    PixelShuffle Reorg ShuffleChannel Flip Tile MatMul Einsum Erf Exp Log Power
    Threshold AbsVal BNLL ArgMax Yolov3DetectionOutput DetectionOutput Softplus CopyTo Fold Unfold
    GridSample LRN
""".split())


@dataclass
class Buffer:
    """One weight buffer of one layer, decoded to float32."""

    label: str
    tagged: bool
    data: np.ndarray


def _conv_like(layer: Layer, size_key: int, bias_key: int, dyn_key: int, out_key: int = 0) -> list[tuple[str, int, bool]]:
    if layer.get_int(dyn_key, 0):
        return []  # weights arrive as a second input blob at run time
    specs = [("weight", layer.get_int(size_key), True)]
    if layer.get_int(bias_key, 0):
        specs.append(("bias", layer.get_int(out_key), False))
    return specs


def buffer_specs(layer: Layer) -> list[tuple[str, int, bool]]:
    """(label, element count, tagged) of every buffer ``layer`` reads, in reading order.

    Raises:
        ValueError: an int8 layer (we only walk float models) or a weighted type not known here.
    """
    t = layer.type
    if layer.get_int(8, 0) and t in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
        raise ValueError(f"layer {layer.name!r} is already int8; start from the fp32 model")
    if t in ("Convolution", "ConvolutionDepthWise", "Convolution1D", "ConvolutionDepthWise1D",
             "Convolution3D", "ConvolutionDepthWise3D"):
        return _conv_like(layer, 6, 5, 19)
    if t in ("Deconvolution", "DeconvolutionDepthWise", "Deconvolution1D", "DeconvolutionDepthWise1D",
             "Deconvolution3D", "DeconvolutionDepthWise3D"):
        return _conv_like(layer, 6, 5, 28)
    if t == "InnerProduct":
        return _conv_like(layer, 2, 1, -1)  # -1: no dynamic-weight key
    if t == "BatchNorm":
        c = layer.get_int(0)
        return [("slope", c, False), ("mean", c, False), ("var", c, False), ("bias", c, False)]
    if t == "Scale":
        n = layer.get_int(0)
        if n == -233:
            return []  # scale comes from a second input blob
        return [("scale", n, False)] + ([("bias", n, False)] if layer.get_int(1) else [])
    if t in ("PReLU", "Bias"):
        return [("data", layer.get_int(0), False)]
    if t == "MemoryData":
        dims = [layer.get_int(k) for k in (0, 1, 11, 2)]
        count = int(np.prod([d for d in dims if d])) if any(dims) else 0
        return [("data", count, layer.get_int(21, 1) == 0)] if count else []
    if t in ("LayerNorm", "InstanceNorm"):
        n = layer.get_int(0)
        return [("gamma", n, False), ("beta", n, False)] if layer.get_int(2, 1) else []
    if t == "GroupNorm":
        n = layer.get_int(1)
        return [("gamma", n, False), ("beta", n, False)] if layer.get_int(3, 1) else []
    if t in WEIGHTLESS:
        return []
    raise ValueError(f"layer {layer.name!r} of type {t} may carry weights this writer does not know")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _read_tagged(blob: bytes, pos: int, count: int) -> tuple[np.ndarray, int]:
    (tag,) = struct.unpack_from("<I", blob, pos)
    pos += 4
    if tag in (TAG_FP32, TAG_FP32_RAW):
        return np.frombuffer(blob, "<f4", count, pos).astype(np.float32), pos + 4 * count
    if tag == TAG_FP16:
        return np.frombuffer(blob, "<f2", count, pos).astype(np.float32), pos + _align4(2 * count)
    raise ValueError(f"weight buffer at byte {pos - 4} has tag {tag:#010x}; only float32/float16 models can be read")


def read_weights(param: ParamFile, blob: bytes) -> dict[str, list[Buffer]]:
    """Decode every layer's buffers; layer name -> buffers in reading order.

    Raises:
        ValueError: unknown weighted layer, unsupported tag, or the walk does not end exactly
            at the end of the file (our layout table disagrees with the converter).
    """
    pos = 0
    out: dict[str, list[Buffer]] = {}
    for layer in param.layers:
        buffers = []
        for label, count, tagged in buffer_specs(layer):
            if tagged:
                data, pos = _read_tagged(blob, pos, count)
            else:
                data = np.frombuffer(blob, "<f4", count, pos).astype(np.float32)
                pos += 4 * count
            buffers.append(Buffer(label, tagged, data))
        if buffers:
            out[layer.name] = buffers
    if pos != len(blob):
        raise ValueError(f"walked {pos} of {len(blob)} bytes of the .bin: layer layouts do not match this model")
    return out


def pack_float(buf: Buffer) -> bytes:
    """A float buffer as ncnn reads it: tagged float32 or raw float32."""
    raw = np.ascontiguousarray(buf.data, dtype="<f4").tobytes()
    return (struct.pack("<I", TAG_FP32) + raw) if buf.tagged else raw


def pack_int8(q: np.ndarray) -> bytes:
    """Tagged int8 weights, padded to a multiple of 4 bytes."""
    raw = np.ascontiguousarray(q, dtype=np.int8).tobytes()
    return struct.pack("<I", TAG_INT8) + raw + b"\0" * (_align4(len(raw)) - len(raw))


def pack_raw(values: np.ndarray) -> bytes:
    """Untagged float32 values (scales, biases)."""
    return np.ascontiguousarray(values, dtype="<f4").tobytes()
