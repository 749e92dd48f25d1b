"""Checkpoint files: what is saved, where, how it is verified and found again.

Layout, in ``<out_dir>/checkpoints/`` (``N`` = completed steps, zero-padded to 8 digits)::

    ckpt-stepN.pt             rank 0: model, optimizer, step, epoch, world size, resolved config
    ckpt-stepN.rank<r>.pt     every rank r: its K-FAC preconditioner state (distkfac's state is per rank), its RNG
                              states (torch, CUDA, numpy, python) and its running sums of the current epoch
    ckpt-stepN.manifest.json  rank 0, last: the size and sha256 of every file above (all ranks'), as each writer
                              computed them while writing; the checkpoint is complete only once it exists
    latest                    the name of the newest complete checkpoint (``ckpt-stepN``)
    corrupt/ckpt-stepN/       a checkpoint found corrupt on resume, moved aside (kept, never pruned)

Model and optimizer are the same on every rank (gradients are averaged), so rank 0 writes them once. Every file
is written atomically (:mod:`jobs.files`: a temporary file, then a rename). Each rank hashes its file as it writes
it; the digests travel to rank 0 with the communicator (one small allgather, which also waits for every rank's
file), and rank 0 writes the manifest and then ``latest``. A manifest per checkpoint, not a sidecar per file: one
file says both "complete" and "these exact bytes", for every rank, and a deleted rank file is found as missing.

On resume (:func:`choose_checkpoint`, rank 0 only; the loop shares its choice): the checkpoints with a manifest,
newest first, are verified (every file's size, then its sha256) until one is valid; the corrupt ones newer than it
are reported and moved to ``corrupt/``. A checkpoint written before manifests existed is used only when ``latest``
names it, unverified (the message says so). ``out_dir`` must be visible to all ranks (a shared file system on a
cluster). A checkpoint resumes only on the same number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, cast

import numpy as np
import torch

from jobs.config import ConfigError
from jobs.files import atomic_file, atomic_write_text

__all__ = [
    "CHECKPOINT_DIR",
    "CORRUPT_DIR",
    "CheckpointError",
    "CheckpointRef",
    "FileDigest",
    "Rejected",
    "ResumeChoice",
    "atomic_torch_save",
    "capture_rng",
    "checkpoint_name",
    "choose_checkpoint",
    "find_latest",
    "has_checkpoint",
    "load_checkpoint",
    "manifest_file",
    "mark_latest",
    "no_valid_checkpoint",
    "prune_checkpoints",
    "rank_file",
    "restore_rng",
    "set_aside_rejected",
    "shared_file",
    "verify_checkpoint",
    "write_manifest",
]

CHECKPOINT_DIR: Final = "checkpoints"
CORRUPT_DIR: Final = "corrupt"
LATEST: Final = "latest"
FORMAT_VERSION: Final = 1
_NAME = re.compile(r"ckpt-step(\d{8,})")
_CHUNK: Final = 1 << 20


class CheckpointError(ConfigError):
    """The run cannot resume from its checkpoints (none valid, or one unreadable): bad input, nothing was trained.

    A ConfigError, so that ``jobs.train`` exits with EXIT_BAD_CONFIG and the run's summary.json is left as it was.
    """


@dataclass(frozen=True)
class CheckpointRef:
    folder: Path
    name: str

    @property
    def step(self) -> int:
        match = _NAME.fullmatch(self.name)
        assert match is not None
        return int(match.group(1))


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and its sha256 (hex), as its writer computed them."""

    size: int
    sha256: str

    def as_ints(self) -> list[int]:
        """For ``Communicator.allgather_ints``: the size, then the digest in 32-bit words (each fits an int64)."""
        return [self.size, *(int(self.sha256[i : i + 8], 16) for i in range(0, 64, 8))]

    @classmethod
    def from_ints(cls, values: Sequence[int]) -> FileDigest:
        size, *words = values
        return cls(int(size), "".join(f"{int(w):08x}" for w in words))


def checkpoint_name(step: int) -> str:
    return f"ckpt-step{step:08d}"


def shared_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.pt"


def rank_file(folder: Path, name: str, rank: int) -> Path:
    return folder / f"{name}.rank{rank}.pt"


def manifest_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.manifest.json"


class _HashingWriter:
    """A write-only file for ``torch.save`` that hashes and counts the bytes it passes on to ``handle``."""

    def __init__(self, handle: IO[Any]) -> None:
        self.handle = handle
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return int(self.handle.write(data))

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: Path) -> FileDigest:
    """``torch.save`` through :func:`jobs.files.atomic_file` (readers see the old file or the whole new one).

    Returns the digest of the bytes written, computed while writing (no second read of the file).
    """
    with atomic_file(path) as handle:
        writer = _HashingWriter(handle)
        torch.save(obj, cast(IO[bytes], writer))  # torch.save needs only write() and flush() of a file object
    return FileDigest(writer.size, writer.hash.hexdigest())


def write_manifest(folder: Path, name: str, digests: Mapping[str, FileDigest]) -> None:
    """The checkpoint's completion marker: every file's name, size and sha256 (call once all files are written)."""
    files = {file: {"size": d.size, "sha256": d.sha256} for file, d in sorted(digests.items())}
    payload = {"format": FORMAT_VERSION, "checkpoint": name, "files": files}
    atomic_write_text(manifest_file(folder, name), json.dumps(payload, indent=1) + "\n")


def mark_latest(folder: Path, name: str) -> None:
    """Points ``latest`` at ``name`` (atomically); call when the checkpoint is complete."""
    atomic_write_text(folder / LATEST, name + "\n")


def find_latest(out_dir: str | Path) -> CheckpointRef | None:
    """The checkpoint ``latest`` names in ``out_dir``, or None (not verified: see :func:`choose_checkpoint`)."""
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


# ---------------------------------------------------------------------------------------------- verify and choose


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_digests(ref: CheckpointRef) -> dict[str, FileDigest]:
    payload = json.loads(manifest_file(ref.folder, ref.name).read_text())
    return {Path(file).name: FileDigest(int(d["size"]), str(d["sha256"])) for file, d in payload["files"].items()}


def verify_checkpoint(ref: CheckpointRef) -> str | None:
    """None when every file of the manifest has its size and sha256; else what is wrong, naming the file.

    Sizes first (cheap, and a truncated or missing file is the common fault), then the hashes.
    """
    try:
        digests = _manifest_digests(ref)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{manifest_file(ref.folder, ref.name).name} is unreadable: {exc}"
    if shared_file(ref.folder, ref.name).name not in digests:
        return f"{manifest_file(ref.folder, ref.name).name} does not list {shared_file(ref.folder, ref.name).name}"
    for file, digest in digests.items():
        path = ref.folder / file
        if not path.is_file():
            return f"{file}: missing"
        if (size := path.stat().st_size) != digest.size:
            return f"{file}: size {size}, expected {digest.size}"
    for file, digest in digests.items():
        if _sha256(ref.folder / file) != digest.sha256:
            return f"{file}: its bytes differ from those written (sha256 mismatch, same size)"
    return None


# How a checkpoint on disk came to be, for a resume.
_VERIFIABLE, _LEGACY, _INCOMPLETE = "verifiable", "legacy", "incomplete"


def _candidates(folder: Path) -> list[tuple[CheckpointRef, str]]:
    """(checkpoint, kind), newest first.

    In a folder with manifests, every checkpoint is verifiable, or incomplete when it has files but no manifest (its
    writing was interrupted, or the manifest was deleted). In a folder without any (written before manifests
    existed), the one ``latest`` names is the only candidate, a legacy one; the files of an interrupted first
    checkpoint are no candidate, so a run killed then starts again from step 0, as before.
    """
    manifests = {m.group(0) for p in folder.glob("ckpt-step*.manifest.json") if (m := _NAME.match(p.name))}
    files = {m.group(0) for p in folder.glob("ckpt-step*.pt") if (m := _NAME.match(p.name))}
    found = {name: _VERIFIABLE for name in manifests}
    if manifests:
        found.update({name: _INCOMPLETE for name in files - manifests})
    else:
        pointer = folder / LATEST
        legacy = pointer.read_text().strip() if pointer.is_file() else ""
        if legacy in files:
            found[legacy] = _LEGACY
    refs = [(CheckpointRef(folder, name), kind) for name, kind in found.items()]
    return sorted(refs, key=lambda item: item[0].step, reverse=True)


def has_checkpoint(out_dir: str | Path) -> CheckpointRef | None:
    """The newest checkpoint of ``out_dir`` that a resume would consider (not verified), or None."""
    candidates = _candidates(Path(out_dir) / CHECKPOINT_DIR)
    return candidates[0][0] if candidates else None


@dataclass(frozen=True)
class Rejected:
    ref: CheckpointRef
    problem: str  # names the file and what is wrong with it


@dataclass(frozen=True)
class ResumeChoice:
    """What a resume found in ``folder``: the newest valid checkpoint (or None) and the corrupt ones newer than it."""

    folder: Path
    ref: CheckpointRef | None
    rejected: tuple[Rejected, ...]  # newest first
    verified: bool = True  # False: ``ref`` predates manifests and was used as ``latest`` names it


def choose_checkpoint(out_dir: str | Path) -> ResumeChoice:
    """The newest valid checkpoint of the run in ``out_dir``; verifies newest first and stops at the first valid.

    Reads only: call :func:`set_aside_rejected` to act on the choice. Every file of every rank is verified, so
    one process (rank 0) can decide for all.
    """
    folder = Path(out_dir) / CHECKPOINT_DIR
    rejected: list[Rejected] = []
    for ref, kind in _candidates(folder):
        if kind == _LEGACY:
            return ResumeChoice(folder, ref, tuple(rejected), verified=False)
        missing = f"{manifest_file(folder, ref.name).name}: missing (its writing was interrupted, or it was deleted)"
        problem = verify_checkpoint(ref) if kind == _VERIFIABLE else missing
        if problem is None:
            return ResumeChoice(folder, ref, tuple(rejected))
        rejected.append(Rejected(ref, problem))
    return ResumeChoice(folder, None, tuple(rejected))


def _move_aside(ref: CheckpointRef) -> Path:
    """Every file of ``ref`` moved to ``corrupt/<name>/`` (a new folder each time); returns that folder."""
    target, copy = ref.folder / CORRUPT_DIR / ref.name, 1
    while target.exists():
        copy += 1
        target = ref.folder / CORRUPT_DIR / f"{ref.name}.{copy}"
    target.mkdir(parents=True)
    for path in sorted(ref.folder.glob(f"{ref.name}.*")):
        os.replace(path, target / path.name)
    return target


def set_aside_rejected(choice: ResumeChoice) -> list[str]:
    """Acts on a choice with a valid checkpoint: the corrupt ones move to ``corrupt/`` (kept, so nothing is lost
    silently, and out of the way of the steps trained again), ``latest`` names the chosen one; returns what to say.
    """
    assert choice.ref is not None
    lines = []
    for rejected in choice.rejected:
        moved = _move_aside(rejected.ref)
        lines.append(
            f"checkpoint {rejected.ref.name} in {choice.folder} is corrupt ({rejected.problem}): moved to {moved} "
            "(inspect or delete it)"
        )
    if choice.rejected:
        lost = choice.rejected[0].ref.step - choice.ref.step
        lines.append(f"resuming from {choice.ref.name}: {lost} steps will be trained again")
        mark_latest(choice.folder, choice.ref.name)
    if not choice.verified:
        lines.append(
            f"checkpoint {choice.ref.name} has no manifest (written before checkpoints were verified): not verified"
        )
    return lines


def no_valid_checkpoint(choice: ResumeChoice) -> CheckpointError:
    """The error for a folder whose checkpoints are all corrupt (nothing is moved: the user decides)."""
    problems = "; ".join(f"{r.ref.name}: {r.problem}" for r in choice.rejected)
    return CheckpointError(
        f"no valid checkpoint in {choice.folder} to resume from ({problems}); nothing was trained or moved. To train "
        f"the run from step 0, move {choice.folder} away (keep it to inspect), or choose another run.out_dir"
    )


# ---------------------------------------------------------------------------------------------- load and prune


def _torch_load(path: Path, ref: CheckpointRef, device: torch.device) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}): move checkpoint {ref.name}'s files out of "
            f"{ref.folder} to resume from the one before, or choose another run.out_dir"
        ) from exc
    return state


def load_checkpoint(ref: CheckpointRef, rank: int, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared state, this rank's state) of the checkpoint ``ref``."""
    path = rank_file(ref.folder, ref.name, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: checkpoint {ref.name} was written by fewer ranks; resume with the same number of ranks"
        )
    shared = _torch_load(shared_file(ref.folder, ref.name), ref, device)
    mine = _torch_load(path, ref, device)
    for state, file in ((shared, shared_file(ref.folder, ref.name)), (mine, path)):
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{file}: checkpoint format {state.get('format')!r}, this code reads {FORMAT_VERSION}")
    return shared, mine


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` checkpoints (every rank's files and the manifest); ``keep = 0`` keeps all.

    ``corrupt/`` is not touched: what a resume set aside stays until the user deletes it.
    """
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
