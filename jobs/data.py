"""Readers for MNIST-like data sets in the IDX format (MNIST, Fashion-MNIST).

The IDX format (http://yann.lecun.com/exdb/mnist/) is a big-endian header followed by raw data:

- bytes 0-1: zero; byte 2: dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
  0x0E float64); byte 3: number of dimensions ``d``;
- ``d`` big-endian uint32 sizes;
- ``prod(sizes)`` items of that dtype, big-endian.

Files may be gzip-compressed (detected from the content, not the name). Anything that does not match
its own header raises a :class:`ValueError` that names the file and the problem.

Default locations on the project's machines:

- Fashion-MNIST (full, 60,000 + 10,000): ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``; ``make setup`` installs it);
- MNIST: ``<repo>/../shared/data/mnist`` (its training files hold only the first 17,435 images; the test
  set is complete), with checksums in ``<repo>/../shared/data/SHA256SUMS``.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Final, Literal

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_ROOT",
    "MNIST_ROOT",
    "REPO_ROOT",
    "SHARED_DATA_ROOT",
    "SHARED_SHA256SUMS",
    "default_root",
    "find_idx_file",
    "load_mnist_like",
    "read_idx",
    "read_sha256sums",
    "verify_sha256",
]

Split = Literal["train", "test"]
DatasetName = Literal["fashion-mnist", "mnist"]

#: The repository's root, from this file's location (not the working directory).
REPO_ROOT: Final[Path] = Path(__file__).resolve().parent.parent
#: Real data sets shared next to the repository (``<repo>/../shared/data``).
SHARED_DATA_ROOT: Final[Path] = REPO_ROOT.parent / "shared" / "data"
#: Checksums of the files under :data:`SHARED_DATA_ROOT` (paths relative to that folder).
SHARED_SHA256SUMS: Final[Path] = SHARED_DATA_ROOT / "SHA256SUMS"
FASHION_MNIST_ROOT: Final[Path] = Path("/usr/share/datasets/fashion-mnist")
MNIST_ROOT: Final[Path] = SHARED_DATA_ROOT / "mnist"

DATASETS: Final[tuple[DatasetName, ...]] = ("fashion-mnist", "mnist")

_HOW_TO_GET: Final[dict[DatasetName, str]] = {
    "fashion-mnist": (
        "install it with `apt-get install dataset-fashion-mnist` (or run `make setup` as root), "
        "or pass the folder that holds the IDX files (root=..., or --data-root)"
    ),
    "mnist": (
        f"expected the shared data next to the repository ({SHARED_DATA_ROOT}); "
        "or pass the folder that holds the IDX files (root=..., or --data-root)"
    ),
}

# IDX dtype code -> numpy dtype as stored (big-endian).
_IDX_DTYPES: Final[dict[int, np.dtype]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC: Final[bytes] = b"\x1f\x8b"

# File stems of an MNIST-like split; each may be found gzip-compressed or plain (see find_idx_file).
_SPLIT_STEMS: Final[dict[str, tuple[str, str]]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_root(dataset: DatasetName) -> Path:
    """The folder where ``dataset`` lives on the project's machines (it may not exist)."""
    if dataset == "fashion-mnist":
        return FASHION_MNIST_ROOT
    if dataset == "mnist":
        return MNIST_ROOT
    raise ValueError(f"unknown data set {dataset!r}; expected one of {DATASETS}")


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (told by its first bytes, not its name)."""
    if not path.exists():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"IDX file {path}: not a regular file")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (gzip or plain) into a native-endian numpy array of the header's shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid IDX (bad magic number, unknown dtype code, byte count not
            matching the header, corrupt gzip data); the message names the file and the problem.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path}: {len(data)} bytes, too short for the 4-byte magic number")
    magic = data[:4]
    if magic[0] != 0 or magic[1] != 0:
        raise ValueError(
            f"IDX file {path}: bad magic number 0x{magic.hex()} (the first two bytes must be zero); not an IDX file"
        )
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({d.name})" for c, d in _IDX_DTYPES.items())
        raise ValueError(f"IDX file {path}: unknown dtype code 0x{code:02X} in magic number; known: {known}")
    if ndim == 0:
        raise ValueError(f"IDX file {path}: magic number 0x{magic.hex()} declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"IDX file {path}: truncated header: {ndim} dimensions need {header_len} bytes, file has {len(data)}"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise ValueError(
            f"IDX file {path}: {what}: header says shape {shape} of {dtype.name} = {expected} data bytes, "
            f"file has {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def find_idx_file(root: str | Path, stem: str) -> Path:
    """The file for ``stem`` (e.g. ``train-images-idx3-ubyte``) in ``root``.

    Looks for ``<stem>.gz``, ``<stem>`` and the dotted spelling some mirrors use
    (``train-images.idx3-ubyte``), in that order.
    """
    root = Path(root)
    dotted = stem.replace("-idx", ".idx")
    candidates = [root / f"{stem}.gz", root / stem, root / f"{dotted}.gz", root / dotted]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(c.name for c in candidates)
    raise FileNotFoundError(f"no IDX file for {stem!r} in {root} (looked for {names})")


def read_sha256sums(sums_file: str | Path) -> dict[Path, str]:
    """Parses a ``sha256sum`` output file into {absolute path: hex digest}.

    Paths in it are taken relative to the file's own folder.
    """
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise FileNotFoundError(f"checksum file {sums_file} does not exist")
    base = sums_file.resolve().parent
    entries: dict[Path, str] = {}
    for lineno, line in enumerate(sums_file.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name  # "<hash>  name" or "<hash> *name"
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"checksum file {sums_file}, line {lineno}: not '<sha256>  <path>': {line!r}")
        entries[(base / name).resolve()] = digest.lower()
    return entries


def verify_sha256(path: str | Path, sums_file: str | Path) -> None:
    """Checks ``path`` against its entry in ``sums_file`` (``sha256sum`` format).

    Raises:
        ValueError: the file has no entry in ``sums_file``, or its digest differs.
    """
    path = Path(path)
    entries = read_sha256sums(sums_file)
    expected = entries.get(path.resolve())
    if expected is None:
        raise ValueError(f"{path}: no entry in checksum file {sums_file}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: SHA256 mismatch: {actual}, expected {expected} (from {sums_file})")


def load_mnist_like(
    root: str | Path | None = None,
    split: Split = "train",
    *,
    dataset: DatasetName = "fashion-mnist",
    sha256sums: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split of an MNIST-like data set from its IDX files.

    Args:
        root: folder with the IDX files (``train-images-idx3-ubyte.gz`` etc., gzip or plain); ``None``
            means :func:`default_root` of ``dataset``.
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).
        dataset: only used to find the default root and to say how to get the data when it is missing.
        sha256sums: optional ``sha256sum``-format file; when given, both files are verified against it.

    Returns:
        ``(images, labels)``: float32 tensor ``N x 1 x H x W`` (28 x 28 for MNIST) scaled to [0, 1], and
        int64 tensor ``N`` of class indices 0-9.
    """
    if split not in _SPLIT_STEMS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if root is None:
        root = default_root(dataset)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} data folder {root} does not exist: {_HOW_TO_GET[dataset]}")
    try:
        image_path, label_path = (find_idx_file(root, stem) for stem in _SPLIT_STEMS[split])
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}: {_HOW_TO_GET[dataset]}") from None
    if sha256sums is not None:
        verify_sha256(image_path, sha256sums)
        verify_sha256(label_path, sha256sums)

    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_path}: expected uint8 labels of shape N, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0-9")

    image_tensor = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    label_tensor = torch.from_numpy(labels).to(torch.int64)
    return image_tensor, label_tensor
