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
import re
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
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    """uint8 (N, H, W, C) pixels ``samples`` were normalised from (image folders), else None."""

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
        if self.pixels is not None and (self.pixels.dtype != np.uint8 or len(self.pixels) != samples.shape[0]):
            raise CalibrationDataError(f"pixels must be uint8 with one entry per sample, got {self.pixels.dtype} "
                                       f"{tuple(self.pixels.shape)} for {samples.shape[0]} samples")
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
            pixels=None if self.pixels is None else self.pixels[idx],
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
        labels: FolderLabels | None = None,
        limit: int | None = None,
    ) -> CalibrationSet:
        """Load the images under ``folder`` (sorted by relative path) with PIL.

        Args:
            folder: the image folder; with ``labels`` each top-level sub-folder is a class and
                ``labels`` says which class index each folder name is.
            preprocess: an :class:`ImagePreprocess` or a callable taking a ``PIL.Image.Image``
                and returning the model input for one sample.
            labels: how class folders are numbered; None reads every image, unlabelled.
            limit: keep at most ``limit`` images: a seeded subset spread evenly over the classes
                (:func:`pick_subset`), chosen before any image is decoded.

        Raises:
            CalibrationDataError: no images, an unreadable image, a folder the labels cannot
                number, or a misshapen result.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CalibrationDataError(f"image folder {str(folder)!r} does not exist")
        files, targets = _image_files(folder, labels)
        if not files:
            raise CalibrationDataError(
                f"image folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)}); add some"
            )
        if limit is not None and limit < len(files):
            keep = pick_subset(None if labels is None else targets, len(files), limit)
            files, targets = [files[i] for i in keep], [targets[i] for i in keep]
        ids = [p.relative_to(folder).as_posix() for p in files]
        y = None if labels is None else np.asarray(targets)
        if isinstance(preprocess, ImagePreprocess):  # the pixels twice, their float32 once, one image in flight
            check_memory((2 * len(files) + 3) * preprocess.sample_bytes,
                         f"{len(files)} images of {str(folder)!r} at {preprocess.height}x{preprocess.width}")
            # The uint8 pixels are kept: the release ships them and the device normalises them.
            pixels = np.stack([_decode_image(folder, p, preprocess.pixels) for p in files])
            return cls(preprocess.normalise(pixels), tuple(ids), y, pixels=pixels)
        arrays = [np.asarray(_decode_image(folder, p, preprocess), dtype=np.float32) for p in files]
        return cls.from_arrays(arrays, labels=y, ids=ids)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_files(folder: Path, labels: FolderLabels | None) -> tuple[list[Path], list[int]]:
    """The images to read, in relative-path order, and each one's class index (-1 unlabelled)."""
    if labels is None:
        files = _images_under(folder)
        return files, [-1] * len(files)
    names = labels.folders(folder)
    index = labels.index(folder, names)
    files, targets = [], []
    for name in names:
        found = _images_under(folder / name)
        files.extend(found)
        targets.extend([index[name]] * len(found))
    stray = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise CalibrationDataError(
            f"image {stray[0]!r} lies directly in {str(folder)!r}, outside the class folders that give the "
            "labels; move it into its class's folder or remove it")
    return files, targets


def _decode_image(folder: Path, path: Path, preprocess: Callable[[Any], np.ndarray]) -> np.ndarray:
    """One untrusted image file through ``preprocess``: decoding problems are one line naming it."""
    from PIL import Image, UnidentifiedImageError  # lazy: PIL is only needed for folders

    rel = path.relative_to(folder).as_posix()
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return preprocess(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CalibrationDataError(
            f"image {rel!r} in {str(folder)!r} is refused as a decompression bomb ({exc}); "
            "remove it or save it at the size the model needs"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CalibrationDataError(
            f"cannot read image {rel!r} in {str(folder)!r}: {exc}; remove or re-save it"
        ) from None


LIMIT_SEED = 0
"""Seed of the subset ``limit`` takes: fixed, so the same spec always reads the same samples."""


def pick_subset(labels: Sequence[int] | np.ndarray | None, n: int, limit: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """Indices (sorted) of a seeded subset of ``limit`` of ``n`` samples, stratified by class.

    With labels the classes take turns (in a seeded order, each class's samples shuffled), so every
    class is represented before any gets a second sample and the subset keeps the set's class
    balance; without labels it is a seeded random sample. Taking the first ``limit`` instead would
    read the alphabetically first classes only.
    """
    rng = np.random.default_rng(seed)
    if limit >= n:
        return np.arange(n)
    if labels is None:
        return np.sort(rng.permutation(n)[:limit])
    y = np.asarray(labels)
    classes = rng.permutation(np.unique(y))
    turn = np.empty(n, dtype=np.int64)  # the round in which each sample is taken
    rank = np.empty(n, dtype=np.int64)  # the class's place within a round
    for r, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        turn[rng.permutation(members)] = np.arange(len(members))
        rank[members] = r
    order = np.lexsort((rank, turn))
    return np.sort(order[:limit])


def _read_numpy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) of a .npy / .npz, headers checked first (see :meth:`CalibrationSet.from_numpy`)."""
    arrays = read_npz_arrays(path, ("x",))
    return arrays["x"], arrays.get("y")


def read_npz_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (all required) and ``y`` (if present) of an .npz, or a .npy as the one
    key when ``keys`` is one key; every header is checked before its data is read."""
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in keys if k not in npz.files]
                if missing:
                    raise CalibrationDataError(
                        f"{str(path)!r} has keys {npz.files}; an .npz needs key(s) {list(keys)} (and optional 'y')")
                wanted = [*keys, *(["y"] if "y" in npz.files else [])]
                for key in wanted:
                    with npz.zip.open(f"{key}.npy") as member:
                        _check_npy_header(member, f"{str(path)!r} array {key!r}")
                return {key: npz[key] for key in wanted}
        if len(keys) != 1:
            raise CalibrationDataError(f"{str(path)!r} is one array; a model with inputs {list(keys)} takes an "
                                       ".npz with one array per input name (and optional 'y')")
        with open(path, "rb") as f:
            _check_npy_header(f, repr(str(path)))
        return {keys[0]: np.load(path, allow_pickle=False)}
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
class FolderLabels:
    """How the class folders of an image folder (its top-level sub-folders) become class indices.

    ``classes``: folder names in class-index order (a folder holding a subset of the classes is
    still labelled right). ``folder_number``: the leading digits of a folder's name are its index
    (``0000_n01440764`` -> 0). Neither: the folders present, in sorted name order. ``include``
    keeps only the folders matching one of its name patterns (``fnmatch``: ``*``, ``?``, ``[05]``).
    """

    classes: tuple[str, ...] | None = None
    folder_number: bool = False
    include: tuple[str, ...] = ()

    @property
    def numbered_by_listing(self) -> bool:
        """True when indices come from which folders happen to be present (no classes, no numbers)."""
        return self.classes is None and not self.folder_number

    def folders(self, folder: Path) -> list[str]:
        """The class folder names read, sorted (hidden folders such as .ipynb_checkpoints skipped)."""
        from fnmatch import fnmatchcase

        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise CalibrationDataError(f"image folder {str(folder)!r} has no class sub-folders, but the spec gives "
                                       "labels for them; put each class's images in a folder named after it")
        if self.include:
            names = [n for n in names if any(fnmatchcase(n, pat) for pat in self.include)]
            if not names:
                raise CalibrationDataError(f"no class folder of {str(folder)!r} matches include "
                                           f"{list(self.include)}; check the patterns (*, ?, [05])")
        return names

    def index(self, folder: Path, names: list[str]) -> dict[str, int]:
        """Folder name -> class index; a folder the rule cannot number is one line naming it."""
        if self.classes is not None:
            position = {name: i for i, name in enumerate(self.classes)}
            unknown = [n for n in names if n not in position]
            if unknown:
                raise CalibrationDataError(
                    f"folder {unknown[0]!r} of {str(folder)!r} ({len(unknown)} of {len(names)} folders) is not in "
                    f"the {len(self.classes)} names of classes; add it there or leave it out with include")
            return {n: position[n] for n in names}
        if self.folder_number:
            out = {}
            for n in names:
                digits = re.match(r"\d+", n)
                if digits is None:
                    raise CalibrationDataError(
                        f"folder {n!r} of {str(folder)!r} does not start with its class number (labels: "
                        "folder-number reads 0000_n01440764 as class 0); rename it or leave it out with include")
                out[n] = int(digits.group())
            return out
        return {n: i for i, n in enumerate(names)}


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
COLORS = ("rgb", "bgr", "grayscale")


@dataclass(frozen=True)
class ImagePreprocess:
    """Image to tensor preprocessing for :meth:`CalibrationSet.from_image_folder`.

    Geometry first (:meth:`pixels`, uint8): ``resize`` to (h, w) as given, or ``resize_shorter``
    (the shorter side to that many pixels, aspect kept), then ``center_crop`` (h, w) (offsets
    ``(size - crop) // 2``); with neither resize nor crop, a plain resize to (height, width).
    Then :meth:`normalise`: ``out = (pixels * scale - mean) / std`` per channel, in ``color``
    order (``bgr`` swaps the first and last channel), laid out NCHW or NHWC. ``height`` and
    ``width`` are the model's input size; the geometry must end there.
    """

    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    color: str = "rgb"
    resize: tuple[int, int] | None = None
    resize_shorter: int | None = None
    center_crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise CalibrationDataError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.color not in COLORS:
            raise CalibrationDataError(f"color must be one of {', '.join(COLORS)}, got {self.color!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise CalibrationDataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                       f"got {self.interpolation!r}")
        if self.resize is not None and self.resize_shorter is not None:
            raise CalibrationDataError("give resize or resize_shorter, not both")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise CalibrationDataError(f"{name} has {len(getattr(self, name))} values; give 1 or one per "
                                           f"channel ({self.channels} for {self.color})")
        if not all(self.std):
            raise CalibrationDataError("std must not be 0")
        if self.resize_shorter is not None and self.center_crop is None:
            raise CalibrationDataError("resize_shorter keeps each image's aspect, so sizes differ; add center_crop "
                                       f"[{self.height}, {self.width}] (the input's size)")
        if self.output_size() != (self.height, self.width):
            raise CalibrationDataError(f"the preprocessing gives {self.output_size()[0]}x{self.output_size()[1]} "
                                       f"images, the input expects {self.height}x{self.width}")

    @property
    def channels(self) -> int:
        return 1 if self.color == "grayscale" else 3

    @property
    def sample_bytes(self) -> int:
        """Bytes of one preprocessed float32 sample."""
        return self.height * self.width * self.channels * 4

    def output_size(self) -> tuple[int, int]:
        """(height, width) of what the geometry gives."""
        if self.center_crop is not None:
            return (int(self.center_crop[0]), int(self.center_crop[1]))
        if self.resize is not None:
            return (int(self.resize[0]), int(self.resize[1]))
        return (self.height, self.width)

    def pixels(self, image: Any) -> np.ndarray:
        """One ``PIL.Image.Image`` -> (H, W, C) uint8 after colour conversion, resize and crop."""
        from PIL import Image

        resample = getattr(Image.Resampling, self.interpolation.upper())
        img = image.convert("L" if self.color == "grayscale" else "RGB")
        if self.resize is not None:
            img = img.resize((self.resize[1], self.resize[0]), resample)
        elif self.resize_shorter is not None:
            w, h = img.size
            s = self.resize_shorter / min(w, h)
            img = img.resize((max(self.resize_shorter, round(w * s)), max(self.resize_shorter, round(h * s))), resample)
        elif self.center_crop is None:
            img = img.resize((self.width, self.height), resample)
        if self.center_crop is not None:
            ch, cw = self.center_crop
            w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2  # a smaller image is padded with black, as PIL crops
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr[:, :, ::-1] if self.color == "bgr" else arr

    def recipe(self) -> dict[str, Any]:
        """What the device needs to turn this geometry's uint8 pixels into the model's input (the
        release ships the pixels and this; pipeline.agent.evaldata)."""
        from pipeline.agent.evaldata import recipe

        return recipe(self.scale, self.mean, self.std, self.layout, stride=self.channels)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(..., H, W, C) uint8 -> float32 ``(pixels * scale - mean) / std``, in this layout: the
        device's own function (pipeline.agent.evaldata.normalise), so both give the same bits."""
        from pipeline.agent.evaldata import normalise

        return normalise(pixels, self.recipe())

    def __call__(self, image: Any) -> np.ndarray:
        """Convert one ``PIL.Image.Image`` to a float32 array (C,H,W) or (H,W,C)."""
        return np.ascontiguousarray(self.normalise(self.pixels(image)), dtype=np.float32)


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
