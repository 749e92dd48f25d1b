"""Checkpoint files: what is saved, where, and how it is found again.

Layout, in ``<out_dir>/checkpoints/`` (``N`` = completed steps, zero-padded to 8 digits)::

    ckpt-stepN.pt          rank 0: model, optimizer, step, epoch, world size, resolved config
    ckpt-stepN.rank<r>.pt  every rank r: its K-FAC preconditioner state (distkfac's state is per rank), its RNG
                           states (torch, CUDA, numpy, python) and its running sums of the current epoch
    latest                 the name of the newest complete checkpoint (``ckpt-stepN``)

Model and optimizer are the same on every rank (gradients are averaged), so rank 0 writes them once. Every file
is written atomically (:mod:`jobs.files`: a temporary file, then a rename); ``latest`` is updated by rank 0 only after
every rank has written its file, so it never names an incomplete checkpoint. ``out_dir`` must be visible to all
ranks (a shared file system on a cluster). A checkpoint resumes only on the same number of ranks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import torch

from jobs.files import atomic_file, atomic_write_text

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointRef",
    "atomic_torch_save",
    "capture_rng",
    "checkpoint_name",
    "find_latest",
    "load_checkpoint",
    "mark_latest",
    "prune_checkpoints",
    "rank_file",
    "restore_rng",
    "shared_file",
]

CHECKPOINT_DIR: Final = "checkpoints"
LATEST: Final = "latest"
FORMAT_VERSION: Final = 1
_NAME = re.compile(r"ckpt-step(\d{8,})")


@dataclass(frozen=True)
class CheckpointRef:
    folder: Path
    name: str

    @property
    def step(self) -> int:
        match = _NAME.fullmatch(self.name)
        assert match is not None
        return int(match.group(1))


def checkpoint_name(step: int) -> str:
    return f"ckpt-step{step:08d}"


def shared_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.pt"


def rank_file(folder: Path, name: str, rank: int) -> Path:
    return folder / f"{name}.rank{rank}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`jobs.files.atomic_file`: readers see the old file or the whole new one."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def mark_latest(folder: Path, name: str) -> None:
    """Points ``latest`` at ``name`` (atomically); call when every rank has written its file."""
    atomic_write_text(folder / LATEST, name + "\n")


def find_latest(out_dir: str | Path) -> CheckpointRef | None:
    """The newest complete checkpoint of the run in ``out_dir``, or None."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _NAME.fullmatch(name):
        raise ValueError(f"{pointer} names {name!r}, not a checkpoint (ckpt-stepNNNNNNNN): delete it or fix it")
    if not shared_file(folder, name).is_file():
        raise FileNotFoundError(f"{pointer} names {name}, but {shared_file(folder, name)} is missing")
    return CheckpointRef(folder, name)


def load_checkpoint(ref: CheckpointRef, rank: int, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared state, this rank's state) of the checkpoint ``ref``."""
    path = rank_file(ref.folder, ref.name, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: checkpoint {ref.name} was written by fewer ranks; resume with the same number of ranks"
        )
    shared = torch.load(shared_file(ref.folder, ref.name), map_location=device, weights_only=True)
    mine = torch.load(path, map_location=device, weights_only=True)
    for state, file in ((shared, shared_file(ref.folder, ref.name)), (mine, path)):
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{file}: checkpoint format {state.get('format')!r}, this code reads {FORMAT_VERSION}")
    return shared, mine


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` checkpoints (every rank's files); ``keep = 0`` keeps all."""
    if keep <= 0:
        return
    names = sorted({m.group(0) for p in folder.glob("ckpt-step*.pt") if (m := _NAME.match(p.name))})
    for name in names[:-keep]:
        for path in folder.glob(f"{name}.*"):
            path.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    """This process's random states, as plain types and tensors (loadable with ``weights_only=True``)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
