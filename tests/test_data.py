"""jobs.data: the IDX reader on the real MNIST / Fashion-MNIST files, and on broken files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from jobs import data
from jobs.data import (
    FASHION_MNIST_ROOT,
    MNIST_ROOT,
    SHARED_SHA256SUMS,
    default_root,
    load_mnist_like,
    read_idx,
    read_sha256sums,
    verify_sha256,
)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> Path:
    """Writes ``array`` as an IDX file (big-endian) with dtype code ``code``."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# --- the real files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "count"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_real_files(split: Literal["train", "test"], count: int) -> None:
    images, labels = load_mnist_like(FASHION_MNIST_ROOT, split)
    assert images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.shape == (count,)
    assert labels.dtype == torch.int64
    assert 0.0 <= images.min().item() < 0.01 and 0.99 < images.max().item() <= 1.0
    # Fashion-MNIST is exactly balanced: 6,000 / 1,000 images per class.
    assert labels.bincount(minlength=10).tolist() == [count // 10] * 10


@pytest.mark.parametrize(("split", "count"), [("train", 17_435), ("test", 10_000)])
def test_mnist_real_files_with_checksums(split: Literal["train", "test"], count: int) -> None:
    images, labels = load_mnist_like(MNIST_ROOT, split, dataset="mnist", sha256sums=SHARED_SHA256SUMS)
    assert images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.min().item() == 0 and labels.max().item() == 9
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0
    counts = labels.bincount(minlength=10)
    assert counts.sum().item() == count and counts.min().item() > 800  # all ten classes present


def test_mnist_checksums_cover_the_files() -> None:
    entries = read_sha256sums(SHARED_SHA256SUMS)
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"]:
        assert (MNIST_ROOT / name).resolve() in entries
        verify_sha256(MNIST_ROOT / name, SHARED_SHA256SUMS)


def test_default_roots_come_from_the_file_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo = Path(data.__file__).resolve().parent.parent
    assert default_root("mnist") == repo.parent / "shared" / "data" / "mnist"
    assert default_root("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    images, labels = load_mnist_like(split="test", dataset="mnist")
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    with pytest.raises(ValueError, match="unknown data set"):
        default_root("cifar")  # type: ignore[arg-type]


def test_read_idx_plain_real_labels(tmp_path: Path) -> None:
    """The uncompressed official file (as users bring it) reads the same as the gzip one."""
    gz = MNIST_ROOT / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(gz))
    assert read_idx(plain).shape == (10_000,)


# --- other dtypes, round trip ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, code: int, dtype: type, compress: bool) -> None:
    array: np.ndarray = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", array, code, compress))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


# --- bad input ------------------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"images-idx3-ubyte: truncated: header says shape \(10, 28, 28\)"):
        read_idx(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    real = (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").read_bytes()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="labels: trailing bytes: header says shape"):
        read_idx(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="short: truncated header"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"PK\x03\x04", b"\x89PNG"])
def test_wrong_magic(tmp_path: Path, magic: bytes) -> None:
    path = tmp_path / "not-idx.bin"
    path.write_bytes(magic + struct.pack(">I", 4) + b"abcd")
    with pytest.raises(ValueError, match=r"not-idx\.bin: bad magic number"):
        read_idx(path)


def test_unknown_dtype_code(tmp_path: Path) -> None:
    path = tmp_path / "odd-dtype"
    path.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 4) + b"abcd")
    with pytest.raises(ValueError, match="odd-dtype: unknown dtype code 0x07"):
        read_idx(path)


def test_too_short_for_magic(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty: 0 bytes"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope-idx3-ubyte.gz"
    with pytest.raises(FileNotFoundError, match=r"nope-idx3-ubyte\.gz"):
        read_idx(missing)


def test_missing_root_says_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_mnist_like(missing, "train")
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="root=") as info:
        load_mnist_like(missing, "test", dataset="mnist")
    assert str(missing) in str(info.value)


def test_missing_file_in_root(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*apt-get install") as info:
        load_mnist_like(tmp_path, "test")
    assert str(tmp_path) in str(info.value)


def test_images_and_labels_disagree(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), compress=True)
    with pytest.raises(ValueError, match=r"has 3 images but .* has 4 labels"):
        load_mnist_like(tmp_path, "test")


def test_label_out_of_range(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 11], np.uint8))
    with pytest.raises(ValueError, match="label 11 out of range"):
        load_mnist_like(tmp_path, "test")


def test_small_files_load(tmp_path: Path) -> None:
    """Plain and dotted file names (as some mirrors spell them) are found; pixels scale to [0, 1]."""
    write_idx(tmp_path / "train-images.idx3-ubyte", np.full((2, 28, 28), 255, np.uint8))
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.array([0, 9], np.uint8))
    images, labels = load_mnist_like(tmp_path, "train")
    assert images.shape == (2, 1, 28, 28) and torch.all(images == 1.0)
    assert labels.tolist() == [0, 9]


def test_checksum_mismatch(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  t10k-labels-idx1-ubyte\n")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: SHA256 mismatch"):
        verify_sha256(path, sums)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: no entry in checksum file"):
        load_mnist_like(tmp_path, "test", sha256sums=sums)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist_like(MNIST_ROOT, "validation", dataset="mnist")  # type: ignore[arg-type]
