"""Training data: the data sets the studies use, held in memory, and each rank's shard of every global batch.

Data sets (``data.name``):

- ``fashion-mnist``, ``mnist``: IDX files, read by :mod:`jobs.data` (default folders there).
- ``cifar10``: the official python batches (a folder ``cifar-10-batches-py`` with ``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch``, or its parent, or the ``cifar-10-python.tar.gz`` tarball), or an image
  folder ``<root>/{train,test}/<class>/*.jpg`` (or a ``.tar.gz`` of one, such as the shared
  ``cifar10-jpeg.tar.gz``, the default). Tarballs are extracted once, split by split, into ``data.cache_dir``;
  decoded images are cached there as ``.npy`` files, so only the first run decodes JPEGs.
- ``synthetic``: Gaussian classes (class means drawn from ``data.synthetic_seed``, unit-variance noise).
- ``teacher``: regression on ``y = A x`` with a low-rank ``A`` (seed 004's teacher; :func:`make_teacher`).

Images are kept as uint8 (CIFAR) or float32 in [0, 1] (IDX); :meth:`Dataset.prepare` turns a batch into
normalised float32 on the training device.

Sharding: the order of the training set is a permutation drawn from ``(seed, epoch)`` alone; global batch ``s``
of an epoch is positions ``[s * B, (s + 1) * B)`` of it (the last incomplete batch is dropped), and rank ``r`` of
``P`` takes the ``r``-th of its ``P`` equal, contiguous parts. So the global batches do not depend on ``P``, and
any step's batch can be computed directly, which is what makes resumed runs identical to uninterrupted ones.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from jobs.config import DATASET_NAMES, ConfigError, DataConfig
from jobs.data import REPO_ROOT, SHARED_DATA_ROOT, default_root, load_mnist_like
from jobs.files import atomic_file, atomic_write_bytes

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TARBALL",
    "DEFAULT_CACHE_DIR",
    "Dataset",
    "ShardedBatches",
    "augment_shard",
    "check_divisible",
    "derive_seed",
    "extract_tarball",
    "load_cifar10",
    "load_cifar10_python",
    "load_dataset",
    "load_image_folder",
    "make_synthetic",
    "make_teacher",
    "resolve_data_path",
]

CIFAR10_CLASSES: Final = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: The shared CIFAR-10 image-folder tarball (see ``<repo>/../shared/data/README.md``).
CIFAR10_TARBALL: Final[Path] = SHARED_DATA_ROOT / "cifar10" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE_DIR: Final[Path] = REPO_ROOT / "build" / "data"
_PYTHON_BATCHES: Final = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_TAR_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar")
_IMAGE_SUFFIXES: Final = {".jpg", ".jpeg", ".png", ".bmp"}
_DECODED_CACHE_VERSION: Final = 1  # part of the cache's folder name: change it when the decoded layout changes


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(seed, epoch)``), well mixed and independent of the platform."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------- the in-memory data set


@dataclass(frozen=True)
class Dataset:
    """A data set in memory: ``*_x`` is N x (shape of one example), uint8 or float32 in [0, 1]; ``*_y`` int64 labels,
    or float targets N x outputs for a regression (``classes`` is then the number of outputs)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    mean: torch.Tensor  # per channel (shape C, 1, 1 for images; 1 otherwise), on the [0, 1] scale
    std: torch.Tensor

    @property
    def regression(self) -> bool:
        return self.train_y.is_floating_point()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def prepare(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch as normalised float32 on ``device``."""
        x = x.to(device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean.to(device)) / self.std.to(device)


def _channel_stats(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``x`` on the [0, 1] scale (identity when ``normalize`` is false)."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 2) if x.dim() == 4 else (1,)
    if not normalize:
        return torch.zeros(shape), torch.ones(shape)
    if x.dtype == torch.uint8:  # exact, from a histogram of the 256 values of each channel
        levels = torch.arange(256, dtype=torch.float64) / 255.0
        counts = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(shape[0])]).double()
        n = counts.sum(1)
        mean = (counts * levels).sum(1) / n
        var = (counts * (levels - mean[:, None]) ** 2).sum(1) / (n - 1).clamp(min=1)
        std = var.sqrt()
    else:
        dims = (0, 2, 3) if x.dim() == 4 else tuple(range(x.dim()))
        var, mean = torch.var_mean(x.float(), dim=dims)
        std = var.sqrt()
    return mean.float().reshape(shape), std.clamp(min=1e-6).float().reshape(shape)


# --------------------------------------------------------------------------- paths and tarballs


def resolve_data_path(config: DataConfig) -> Path | None:
    """The file or folder ``config`` reads (None for synthetic data); raises if it does not exist."""
    if config.name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {config.name!r}; choose one of {', '.join(DATASET_NAMES)} (data.name)")
    if config.name in ("synthetic", "teacher"):
        return None
    if config.path:
        path = Path(config.path).expanduser()
    elif config.name == "cifar10":
        path = CIFAR10_TARBALL
    else:
        path = default_root(config.name)  # type: ignore[arg-type]
    if not path.exists():
        how = {
            "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`",
            "mnist": f"the shared data lives in {SHARED_DATA_ROOT}",
            "cifar10": "give the cifar-10-batches-py folder, an image folder, or a .tar.gz of either",
        }[config.name]
        raise FileNotFoundError(f"{config.name} data path {path} does not exist: set data.path, or {how}")
    return path


def _is_tarball(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_TAR_SUFFIXES)


def _tarball_stem(path: Path) -> str:
    for suffix in _TAR_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def extract_tarball(
    tarball: Path, dest: Path, select: Callable[[str], bool] = lambda name: True, tag: str = "all"
) -> Path:
    """Extracts the members of ``tarball`` whose names ``select`` accepts into ``dest``, once.

    A marker ``dest/.<tag>.extracted`` records the tarball's size and modification time, so a later call
    returns at once, and a changed tarball is extracted again. Members are unpacked into a fresh temporary
    folder and moved into place, so concurrent callers (ranks sharing a cache) never see a half-written file.
    """
    stamp = f"{tarball.resolve()} {tarball.stat().st_size} {tarball.stat().st_mtime_ns}\n"
    marker = dest / f".{tag}.extracted"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    scratch = dest / f".tmp-{uuid.uuid4().hex}"
    try:
        with tarfile.open(tarball) as archive:
            members = [m for m in archive if select(m.name)]
            if not any(m.isfile() for m in members):
                raise ValueError(f"{tarball}: no files to extract for {tag!r}")
            archive.extractall(scratch, members=members, filter="data")
        for item in sorted(scratch.rglob("*")):
            target = dest / item.relative_to(scratch)
            if item.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                os.replace(item, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_bytes(marker, stamp.encode())
    return dest


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as handle:  # np.save into an open file adds no ".npy" to the name
        np.save(handle, array)


# --------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches (dicts of numpy arrays, lists, bytes) and nothing else: no other code."""

    _ALLOWED: Final = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
        ("_codecs", "encode"),  # how Python 3 writes bytes with protocol 2 (only turns a str into bytes)
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file {path} does not exist (expected data_batch_1..5 and test_batch)")
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"CIFAR-10 batch file {path}: not a python batch pickle ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch file {path}: expected a dict, got {type(batch).__name__}")
    get = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in get or "labels" not in get:
        raise ValueError(f"CIFAR-10 batch file {path}: needs keys 'data' and 'labels', has {sorted(get)}")
    data = np.asarray(get["data"])
    labels = np.asarray(get["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"CIFAR-10 batch file {path}: expected uint8 data N x 3072 and N labels, got {data.dtype} "
            f"{data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_python(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the official python batches: uint8 N x 3 x 32 x 32 images, int64 labels."""
    folder = Path(folder)
    parts = [_read_python_batch(folder / name) for name in _PYTHON_BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batches in {folder}: labels outside 0-9")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _decode_folder(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image  # Pillow: only needed for image folders

    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"image folder {split_dir}: no class folders (expected {split_dir}/<class>/*.jpg)")
    per_class = [sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) for d in class_dirs]
    # Round robin over the classes (the first image of each class, then the second, ...), so that any prefix,
    # such as data.train_examples = N, holds all classes in equal parts.
    order = sorted((i, label) for label, files in enumerate(per_class) for i in range(len(files)))
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i, label in order:
        with Image.open(per_class[label][i]) as image:
            images.append(np.asarray(image.convert("RGB")))
        labels.append(label)
    if not images:
        raise ValueError(f"image folder {split_dir}: no images")
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"image folder {split_dir}: images of different sizes {sorted(shapes)[:3]}")
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def load_image_folder(
    root: str | Path, split: str, cache_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<split>/<class>/*.jpg`` (classes in sorted order = labels 0, 1, ...) as uint8 N x 3 x H x W.

    The images come round robin over the classes (each class's files in sorted order), so prefixes are balanced.

    With ``cache_dir``, the decoded arrays are saved there as ``.npy`` (named after the folder's absolute
    path) and read from there next time.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {root} has no {split}/ folder (expected {root}/{split}/<class>/*.jpg)")
    cached: tuple[Path, Path] | None = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{root.resolve()} {_DECODED_CACHE_VERSION}".encode()).hexdigest()[:12]
        folder = Path(cache_dir) / "decoded" / f"{root.name}-{key}"
        cached = (folder / f"{split}-images.npy", folder / f"{split}-labels.npy")
        if all(p.is_file() for p in cached):
            images, labels = np.load(cached[0]), np.load(cached[1])
            if len(images) == len(labels):
                return torch.from_numpy(images), torch.from_numpy(labels)
    images, labels = _decode_folder(split_dir)
    if cached is not None:
        cached[0].parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(cached[1], labels)
        _atomic_save_npy(cached[0], images)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _find_cifar_root(path: Path, fmt: str, split: str) -> tuple[str, Path]:
    """(format, folder) of the CIFAR-10 copy at ``path`` (an extracted folder) that holds ``split``."""
    candidates: list[tuple[str, Path]] = []
    if fmt in ("auto", "python"):
        candidates += [("python", path), ("python", path / "cifar-10-batches-py")]
    if fmt in ("auto", "folder"):
        candidates += [("folder", path)] + [("folder", sub) for sub in sorted(path.iterdir()) if sub.is_dir()]
    for kind, folder in candidates:
        if kind == "python" and (folder / "test_batch").is_file():
            return kind, folder
        if kind == "folder" and (folder / split).is_dir():
            return kind, folder
    wanted = {
        "auto": f"cifar-10-batches-py (data_batch_1..5, test_batch) or an image folder with {split}/<class>/*.jpg",
        "python": "cifar-10-batches-py (data_batch_1..5, test_batch)",
        "folder": f"an image folder with {split}/<class>/*.jpg",
    }[fmt]
    raise FileNotFoundError(f"CIFAR-10: {path} does not hold {wanted} (data.path, data.format)")


def load_cifar10(
    path: str | Path, split: str, *, cache_dir: str | Path = DEFAULT_CACHE_DIR, fmt: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 split from a folder or tarball in either format (see the module docstring)."""
    path = Path(path)
    cache_dir = Path(cache_dir)
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 data path {path} does not exist (data.path)")
    if _is_tarball(path):
        dest = cache_dir / _tarball_stem(path)

        def wanted(name: str) -> bool:  # only this split of an image folder; python batches are all small
            parts = Path(name).parts
            return split in parts or "cifar-10-batches-py" in parts or not {"train", "test"} & set(parts)

        path = extract_tarball(path, dest, wanted, tag=split)
    kind, folder = _find_cifar_root(path, fmt, split)
    if kind == "python":
        return load_cifar10_python(folder, split)
    images, labels = load_image_folder(folder, split, cache_dir)
    if images.shape[1:] != (3, 32, 32):
        raise ValueError(f"CIFAR-10 image folder {folder}: images of shape {tuple(images.shape[1:])}, not 32 x 32 RGB")
    return images, labels


# --------------------------------------------------------------------------- synthetic


def make_synthetic(
    shape: tuple[int, ...], classes: int, train_size: int, test_size: int, separation: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian classes: ``x = mean[y] + noise``, noise standard normal, y uniform, class means drawn from ``seed``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 7))
    # Means of norm about `separation`: neighbouring classes are about 1.4 * separation noise deviations apart.
    means = torch.randn(classes, *shape, generator=generator) * (separation / float(np.prod(shape)) ** 0.5)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=generator)
        return means[y] + torch.randn(n, *shape, generator=generator), y

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return train_x, train_y, test_x, test_y


def make_teacher(
    inputs: int, outputs: int, singular_values: list[float], train_size: int, test_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = A x`` with ``A = U diag(singular_values) V^T`` (``outputs x inputs``, U and V drawn from ``seed``).

    The training inputs are whitened, ``X^T X / n = I``, so that ``A`` is what the squared loss sees: its singular
    values are the sizes of the modes a small network learns one by one. The test inputs are standard normal."""
    if train_size < inputs:
        raise ValueError(f"a teacher with {inputs} inputs needs at least {inputs} training examples, got {train_size}")
    generator = torch.Generator().manual_seed(derive_seed(seed, 11))
    rank = len(singular_values)
    left, _ = torch.linalg.qr(torch.randn(outputs, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(inputs, rank, generator=generator, dtype=torch.float64))
    teacher = (left * torch.tensor(singular_values, dtype=torch.float64)) @ right.T
    train_x, _ = torch.linalg.qr(torch.randn(train_size, inputs, generator=generator, dtype=torch.float64))
    train_x = train_x * train_size**0.5
    test_x = torch.randn(test_size, inputs, generator=generator, dtype=torch.float64)
    return (train_x.float(), (train_x @ teacher.T).float(), test_x.float(), (test_x @ teacher.T).float())


# --------------------------------------------------------------------------- loading


def example_shape(config: DataConfig) -> tuple[tuple[int, ...], int]:
    """One example's shape and the number of classes of the data set ``config`` names, without loading it."""
    if config.name in ("synthetic", "teacher"):
        return tuple(config.synthetic_shape), config.synthetic_classes
    return ((3, 32, 32) if config.name == "cifar10" else (1, 28, 28)), 10


def load_dataset(config: DataConfig) -> Dataset:
    """The data set ``config`` names, both splits, limited to ``train_examples`` / ``test_examples``."""
    path = resolve_data_path(config)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else DEFAULT_CACHE_DIR
    if config.name == "synthetic":
        train_x, train_y, test_x, test_y = make_synthetic(
            tuple(config.synthetic_shape),
            config.synthetic_classes,
            config.synthetic_train_size,
            config.synthetic_test_size,
            config.synthetic_separation,
            config.synthetic_seed,
        )
        classes = config.synthetic_classes
    elif config.name == "teacher":
        train_x, train_y, test_x, test_y = make_teacher(
            config.synthetic_shape[0],
            config.synthetic_classes,
            config.teacher_singular_values,
            config.synthetic_train_size,
            config.synthetic_test_size,
            config.synthetic_seed,
        )
        classes = config.synthetic_classes
    elif config.name == "cifar10":
        assert path is not None
        train_x, train_y = load_cifar10(path, "train", cache_dir=cache_dir, fmt=config.format)
        test_x, test_y = load_cifar10(path, "test", cache_dir=cache_dir, fmt=config.format)
        classes = 10
    else:
        train_x, train_y = load_mnist_like(path, "train", dataset=config.name)  # type: ignore[arg-type]
        test_x, test_y = load_mnist_like(path, "test", dataset=config.name)  # type: ignore[arg-type]
        classes = 10
    if config.train_examples:
        train_x, train_y = train_x[: config.train_examples], train_y[: config.train_examples]
    if config.test_examples:
        test_x, test_y = test_x[: config.test_examples], test_y[: config.test_examples]
    mean, std = _channel_stats(train_x, config.normalize and config.name != "teacher")  # the teacher's are whitened
    return Dataset(config.name, train_x, train_y, test_x, test_y, classes, mean, std)


# --------------------------------------------------------------------------- sharding


def check_divisible(global_batch: int, world_size: int) -> int:
    """The per-rank batch size; raises when ``global_batch`` does not split equally over ``world_size`` ranks."""
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        fix = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ConfigError(
            f"the global batch size {global_batch} (data.batch_size) is not divisible by the {world_size} ranks: "
            f"set data.batch_size to a multiple of {world_size} (e.g. {fix}), or run on a number of ranks "
            f"that divides {global_batch}"
        )
    return global_batch // world_size


class ShardedBatches:
    """This rank's part of every global batch: indices into the training set, computed from (seed, epoch, step)."""

    def __init__(self, examples: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        self.local_batch = check_divisible(global_batch, world_size)
        if global_batch > examples:
            raise ConfigError(
                f"the global batch size {global_batch} (data.batch_size) is larger than the training set "
                f"({examples} examples): lower data.batch_size or use more data (data.train_examples)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.examples = examples
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = examples // global_batch
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training set for ``epoch`` (the same on every rank)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))
            self._order = torch.randperm(self.examples, generator=generator)
            self._epoch = epoch
        return self._order

    def global_indices(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} is outside an epoch of {self.steps_per_epoch} steps")
        start = step_in_epoch * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def shard_slice(self) -> slice:
        """This rank's positions within a global batch."""
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def indices(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        """This rank's training-set indices for step ``step_in_epoch`` of ``epoch``."""
        return self.global_indices(epoch, step_in_epoch)[self.shard_slice()]


def augment_shard(images: torch.Tensor, shard: slice, global_batch: int, seed: int, pad: int = 4) -> torch.Tensor:
    """Random crop (``pad`` pixels of zero padding) and horizontal flip of this rank's images.

    The crop offsets and flips are drawn for the whole global batch from ``seed`` and this rank's part is used,
    so the augmented global batch does not depend on the number of ranks.
    """
    if images.dim() != 4:
        shape = tuple(images.shape[1:])
        raise ValueError(f"data.augment needs images (N x C x H x W); the examples here have shape {shape}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 2 * pad + 1, (global_batch, 2), generator=generator)[shard]
    flips = (torch.rand(global_batch, generator=generator) < 0.5)[shard]
    _, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    out = torch.empty_like(images)
    for i, ((dy, dx), flip) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
        crop = padded[i, :, dy : dy + height, dx : dx + width]
        out[i] = crop.flip(-1) if flip else crop
    return out
