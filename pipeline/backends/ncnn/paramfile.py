"""Read and write ncnn's text .param format (ncnn wiki: param-and-model-file-structure).

::

    7767517                              magic
    [layer count] [blob count]
    [type] [name] [n_in] [n_out] [in blobs...] [out blobs...] [key=value ...]

Keys 0..19 hold an int or a float; ``-23300 - k`` holds an array ``count,v1,v2,...``. Values are
kept as the exact strings ncnn wrote, so a file that is read and written back is unchanged
except for the keys we set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MAGIC = "7767517"


@dataclass
class Layer:
    """One layer line."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str] = field(default_factory=dict)

    def get_int(self, key: int, default: int = 0) -> int:
        """An integer param (``default`` when absent, as ncnn's ParamDict.get)."""
        return int(self.params[key]) if key in self.params else default

    def get_float_array(self, key: int) -> list[float]:
        """An array param (stored under ``-23300 - key``), without its leading count."""
        raw = self.params.get(-23300 - key)
        return [] if raw is None else [float(v) for v in raw.split(",")[1:]]

    def line(self) -> str:
        """The layer as one line of a .param file."""
        parts = [f"{self.type:<24} {self.name:<24} {len(self.bottoms)} {len(self.tops)}", *self.bottoms, *self.tops]
        parts += [f"{k}={v}" for k, v in self.params.items()]
        return " ".join(parts)


@dataclass
class ParamFile:
    """A whole .param file."""

    layers: list[Layer]

    @property
    def blob_count(self) -> int:
        """Distinct blobs produced by the layers."""
        return len({t for layer in self.layers for t in layer.tops})

    def inputs(self) -> list[str]:
        """Blob names produced by ``Input`` layers, in file order."""
        return [t for layer in self.layers if layer.type == "Input" for t in layer.tops]

    def outputs(self) -> list[str]:
        """Blobs that some layer produces and no layer consumes, in file order."""
        consumed = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in consumed]

    def text(self) -> str:
        """Serialized .param text."""
        lines = [MAGIC, f"{len(self.layers)} {self.blob_count}", *(layer.line() for layer in self.layers)]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write the .param file."""
        Path(path).write_text(self.text(), encoding="utf-8")


def parse(text: str) -> ParamFile:
    """Parse .param text.

    Raises:
        ValueError: wrong magic number or a malformed layer line.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != MAGIC:
        raise ValueError(f"not an ncnn text .param file (magic {lines[0] if lines else ''!r}, want {MAGIC})")
    n_layers = int(lines[1].split()[0])
    layers = []
    for ln in lines[2:2 + n_layers]:
        tok = ln.split()
        n_in, n_out = int(tok[2]), int(tok[3])
        bottoms, tops = tok[4:4 + n_in], tok[4 + n_in:4 + n_in + n_out]
        params = {}
        for kv in tok[4 + n_in + n_out:]:
            key, _, value = kv.partition("=")
            params[int(key)] = value
        layers.append(Layer(tok[0], tok[1], bottoms, tops, params))
    if len(layers) != n_layers:
        raise ValueError(f".param declares {n_layers} layers but has {len(layers)} layer lines")
    return ParamFile(layers)


def read(path: Path) -> ParamFile:
    """Parse a .param file."""
    return parse(Path(path).read_text(encoding="utf-8"))
