"""One way to write a file that readers never see half-written: a temporary file, fsync, rename.

The temporary file lies in the target's folder (a rename is atomic only within one file system) under a unique
name (two writers never share it), is flushed to disk before the rename (a crash right after leaves the old or the
new file, never an empty one), and the folder is synced after (so that the rename itself survives a crash).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text"]


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some network file systems): the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yields an open temporary file; on a clean exit it replaces ``path``, on an exception it is removed.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). The folder is created if missing.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(name)
    try:
        encoding = None if mode == "wb" else "utf-8"
        with open(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(target.parent)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(payload)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)
