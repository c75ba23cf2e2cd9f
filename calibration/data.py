"""Calibration data: one immutable set of float32 samples with ids, labels and content hashes.

Every backend is calibrated from the same :class:`CalibrationSet`, so its hash is part of every
cache key downstream (statistics, ranges, artifacts). The hash covers the sample bytes, their
shape and the labels, so re-ordering or re-labelling the set is a different set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _sample_digest(sample: np.ndarray) -> str:
    """sha256 of one sample's float32 bytes (C order), shape included so reshapes differ."""
    arr = np.ascontiguousarray(sample, dtype=np.float32)
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration (or evaluation) set.

    Attributes:
        samples: float32 array of shape (N, *input_shape).
        ids: one id per sample: a file name, or ``"index:i"`` for in-memory data.
        labels: optional int64 array of shape (N,).
    """

    samples: np.ndarray
    ids: tuple[str, ...]
    labels: np.ndarray | None = None
    _digests: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        if samples.ndim < 2 or samples.shape[0] == 0:
            raise CalibrationDataError(
                "the data set is empty: give at least one sample (got array of shape "
                f"{tuple(samples.shape)})"
            )
        if len(self.ids) != samples.shape[0]:
            raise CalibrationDataError(
                f"the data set has {samples.shape[0]} samples but {len(self.ids)} ids; "
                "give one id per sample"
            )
        if len(set(self.ids)) != len(self.ids):
            raise CalibrationDataError("sample ids must be unique; rename the duplicate samples")
        bad = np.flatnonzero(~np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1))
        if bad.size:
            raise CalibrationDataError(
                f"sample {self.ids[int(bad[0])]!r} contains NaN or Inf; fix or drop it"
            )
        labels = self.labels
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (samples.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise CalibrationDataError(
                    f"labels must be integer class indices of shape ({samples.shape[0]},), got "
                    f"{labels.dtype} {tuple(labels.shape)}; store them as integers (e.g. int64)"
                )
            labels = labels.astype(np.int64)
        samples.setflags(write=False)
        object.__setattr__(self, "samples", samples)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "_digests", tuple(_sample_digest(s) for s in samples))

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the batch axis)."""
        return tuple(int(d) for d in self.samples.shape[1:])

    @property
    def sample_hashes(self) -> tuple[str, ...]:
        """Per-sample sha256 digests, in sample order."""
        return self._digests

    @property
    def content_hash(self) -> str:
        """Stable sha256 over the samples (shape and bytes) and the labels."""
        h = hashlib.sha256(b"edgeship-calibration-set-v1")
        h.update(repr(self.samples.shape).encode())
        for d in self._digests:
            h.update(d.encode())
        if self.labels is not None:
            h.update(b"labels")
            h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray) -> CalibrationSet:
        """Return the samples at ``indices`` as a new set (ids and labels follow)."""
        idx = np.asarray(indices, dtype=np.int64)
        return CalibrationSet(
            samples=self.samples[idx],
            ids=tuple(self.ids[i] for i in idx),
            labels=None if self.labels is None else self.labels[idx],
        )

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet]:
        """Split into (fit, holdout) with a seeded permutation.

        The holdout scores methods and fallback decisions; ranges are fitted on the rest, so the
        score is not measured on the data that chose the ranges.

        Args:
            holdout_fraction: share of samples held out, in (0, 1).
            seed: permutation seed.

        Returns:
            The fit part and the holdout part; each has at least one sample.
        """
        n = len(self)
        if not 0.0 < holdout_fraction < 1.0:
            raise CalibrationDataError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if n < 2:
            raise CalibrationDataError(
                f"the calibration set has {n} sample; the INT8 search holds out part of it to score "
                "methods, so it needs at least 2: add samples to calibration.source"
            )
        k = min(n - 1, max(1, int(round(n * holdout_fraction))))
        perm = np.random.default_rng(seed).permutation(n)
        return self.subset(np.sort(perm[k:])), self.subset(np.sort(perm[:k]))

    def manifest(self) -> dict[str, Any]:
        """JSON-able manifest: set hash, shape and one entry (id, sha256, label) per sample."""
        entries = []
        for i, (sid, digest) in enumerate(zip(self.ids, self._digests)):
            entry: dict[str, Any] = {"id": sid, "sha256": digest}
            if self.labels is not None:
                entry["label"] = int(self.labels[i])
            entries.append(entry)
        return {
            "format": "edgeship-calibration-manifest-v1",
            "set_sha256": self.content_hash,
            "count": len(self),
            "input_shape": list(self.input_shape),
            "dtype": "float32",
            "samples": entries,
        }

    def write_manifest(self, path: Path) -> Path:
        """Write :meth:`manifest` as JSON to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.manifest(), indent=1) + "\n")
        return path

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_arrays(
        cls,
        arrays: Iterable[np.ndarray],
        labels: Sequence[int] | np.ndarray | None = None,
        ids: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> CalibrationSet:
        """Build a set from an iterable of per-sample arrays (or one stacked array).

        Args:
            arrays: samples; each must have ``input_shape`` (default: the first sample's shape).
            labels: optional integer labels.
            ids: optional ids; default ``"index:i"``.
            input_shape: expected shape of one sample.

        Raises:
            CalibrationDataError: empty input or a sample with the wrong shape.
        """
        if isinstance(arrays, np.ndarray):
            items: list[np.ndarray] = list(arrays) if arrays.ndim >= 2 else [arrays]
        else:
            items = [np.asarray(a) for a in arrays]
        if not items:
            raise CalibrationDataError("the data set is empty: the source gave no samples; give at least one")
        names = list(ids) if ids is not None else [f"index:{i}" for i in range(len(items))]
        if len(names) != len(items):
            raise CalibrationDataError(f"got {len(items)} arrays but {len(names)} ids")
        expected = tuple(input_shape) if input_shape is not None else tuple(items[0].shape)
        for name, a in zip(names, items):
            if tuple(a.shape) != expected:
                raise CalibrationDataError(
                    f"sample {name!r} has shape {tuple(a.shape)}, expected {expected}; "
                    "resize it or fix input_shape"
                )
        stacked = np.stack([a.astype(np.float32, copy=False) for a in items])
        return cls(stacked, tuple(names), None if labels is None else np.asarray(labels))

    @classmethod
    def from_numpy(cls, path: Path, input_shape: Sequence[int] | None = None) -> CalibrationSet:
        """Load a set from ``.npy`` (samples) or ``.npz`` (key ``x``, optional ``y``).

        The file is untrusted: it is read with ``allow_pickle=False``, and each array's header
        (dtype, shape) is checked before its data is read, so object arrays and arrays larger than
        the memory available are refused without being allocated.

        Raises:
            CalibrationDataError: the file is missing, unreadable, lacks ``x``, holds objects,
                does not fit in memory or is misshapen.
        """
        path = Path(path)
        x, y = _read_numpy(path)
        if x.size == 0 or x.ndim < 2:
            raise CalibrationDataError(f"data file {str(path)!r} holds no samples (shape {x.shape}); "
                                       "give an array of shape (N, *input_shape) with N >= 1")
        ids = [f"{path.name}:{i}" for i in range(x.shape[0])]
        return cls.from_arrays(list(x), labels=y, ids=ids, input_shape=input_shape)

    @classmethod
    def from_image_folder(
        cls,
        folder: Path,
        preprocess: ImagePreprocess | Callable[[Any], np.ndarray],
        labels_from_subfolders: bool = False,
        limit: int | None = None,
    ) -> CalibrationSet:
        """Load every image under ``folder`` (sorted by relative path) with PIL.

        Args:
            folder: the image folder; with ``labels_from_subfolders`` each sub-folder is a class
                (classes numbered in sorted name order).
            preprocess: an :class:`ImagePreprocess` or a callable taking a ``PIL.Image.Image``
                and returning the model input for one sample.
            labels_from_subfolders: read labels from the sub-folder names.
            limit: keep the first ``limit`` images only.

        Raises:
            CalibrationDataError: no images, an unreadable image, or a misshapen result.
        """
        from PIL import Image, UnidentifiedImageError  # lazy: PIL is only needed for folders

        folder = Path(folder)
        if not folder.is_dir():
            raise CalibrationDataError(f"image folder {str(folder)!r} does not exist")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if limit is not None:
            files = files[:limit]
        if not files:
            raise CalibrationDataError(
                f"image folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)}); add some"
            )
        if isinstance(preprocess, ImagePreprocess):  # the list of arrays, their stack, one image in flight
            check_memory((2 * len(files) + 3) * preprocess.sample_bytes,
                         f"{len(files)} images of {str(folder)!r} at {preprocess.height}x{preprocess.width}")
        classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
        arrays, ids, labels = [], [], []
        for p in files:
            rel = p.relative_to(folder).as_posix()
            try:
                with warnings.catch_warnings():
                    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both.
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(p) as img:
                        img.load()
                        arr = preprocess(img)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise CalibrationDataError(
                    f"image {rel!r} in {str(folder)!r} is refused as a decompression bomb ({exc}); "
                    "remove it or save it at the size the model needs"
                ) from None
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise CalibrationDataError(
                    f"cannot read image {rel!r} in {str(folder)!r}: {exc}; remove or re-save it"
                ) from None
            arrays.append(np.asarray(arr, dtype=np.float32))
            ids.append(rel)
            labels.append(classes.index(p.parent.relative_to(folder).as_posix()))
        return cls.from_arrays(arrays, labels=labels if labels_from_subfolders else None, ids=ids)


def _read_numpy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) of a .npy / .npz, headers checked first (see :meth:`CalibrationSet.from_numpy`)."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    raise CalibrationDataError(
                        f"{str(path)!r} has keys {npz.files}; an .npz needs key 'x' (and optional 'y')")
                keys = ["x"] + (["y"] if "y" in npz.files else [])
                for key in keys:
                    with npz.zip.open(f"{key}.npy") as member:
                        _check_npy_header(member, f"{str(path)!r} array {key!r}")
                x, y = npz["x"], npz["y"] if "y" in npz.files else None
                return x, y
        with open(path, "rb") as f:
            _check_npy_header(f, repr(str(path)))
        return np.load(path, allow_pickle=False), None
    except CalibrationDataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CalibrationDataError(
            f"cannot read data file {str(path)!r}: {exc}; give a .npy or .npz written by numpy"
        ) from None


def _check_npy_header(f: Any, what: str) -> None:
    """Refuse object arrays and arrays too large for memory from the .npy header alone."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise CalibrationDataError(f"{what}: .npy format version {version} is not supported; save with numpy")
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise CalibrationDataError(f"{what} holds Python objects (dtype {dtype}); edgeship never unpickles "
                                   "data files: save numeric arrays (e.g. float32 samples, int64 labels)")
    # float32 copies: the array as read, the float32 stack and the set's own samples
    check_memory(int(np.prod(shape, dtype=np.float64)) * max(dtype.itemsize, 4) * 3, f"{what} of shape {shape}")


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit when set."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        root = Path("/sys/fs/cgroup")
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((root / "memory.current").read_text()))
    return avail


def check_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, data that would not fit in memory (not a MemoryError or a swap storm)."""
    avail = available_memory()
    if nbytes > avail:
        raise CalibrationDataError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, {avail / 2**30:.1f} GiB are available; "
            "use fewer or smaller samples (input.shape, preprocessing.resize, the source's limit)")


@dataclass(frozen=True)
class ImagePreprocess:
    """Image to tensor preprocessing for :meth:`CalibrationSet.from_image_folder`.

    ``out = (pixels * scale - mean) / std`` per channel, after resize to (height, width).
    """

    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    color: str = "rgb"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise CalibrationDataError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.color not in ("rgb", "grayscale"):
            raise CalibrationDataError(f"color must be 'rgb' or 'grayscale', got {self.color!r}")

    @property
    def sample_bytes(self) -> int:
        """Bytes of one preprocessed float32 sample."""
        return self.height * self.width * (3 if self.color == "rgb" else 1) * 4

    def __call__(self, image: Any) -> np.ndarray:
        """Convert one ``PIL.Image.Image`` to a float32 array (C,H,W) or (H,W,C)."""
        from PIL import Image

        img = image.convert("RGB" if self.color == "rgb" else "L")
        img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) * self.scale
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr


def check_overlap(calib_set: CalibrationSet, eval_set: CalibrationSet) -> None:
    """Refuse a calibration set that shares samples with the evaluation set.

    Samples are compared by content hash, so a renamed copy is still caught.

    Raises:
        CalibrationDataError: naming the overlapping calibration and evaluation sample ids.
    """
    eval_index = {d: sid for sid, d in zip(eval_set.ids, eval_set.sample_hashes)}
    pairs = [(sid, eval_index[d]) for sid, d in zip(calib_set.ids, calib_set.sample_hashes) if d in eval_index]
    if pairs:
        shown = ", ".join(f"{c!r}=={e!r}" for c, e in pairs[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        raise CalibrationDataError(
            f"{len(pairs)} calibration sample(s) also in the evaluation set: {shown}{more}; "
            "remove them from one of the sets"
        )
