"""Who owns the embedded server of a data directory, and what becomes of a server whose owner is gone.

Right after starting nx-27017 its owner writes ``<data_dir>/nx-27017.owner`` (JSON: the owner's PID, the server's
PID and port, the start time); nx-27017 writes its own PID to ``nx-27017.pid`` and refuses to start while that
process lives ("NX-27017 is already running"). Before a start, :func:`clear_previous` looks at a server still
running on the folder:

- its parent is the recorded owner: the owner lives (another study, driver or ``hpo_worker server`` uses the
  folder), and the start is refused with both PIDs and what to do;
- otherwise its owner is gone (the kernel gave the orphan another parent): it is stopped, and a line says so. It is
  not reused: the new owner could not tie it to its own life (:mod:`hpo_worker.server_process`), so it would outlive
  this owner too; a new server starts in well under a second.

The parent link, rather than the owner's PID alone, says whether the owner lives: a PID is reused after its process
is gone, a parent link is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from jobs.files import atomic_write_text

__all__ = ["OwnerRecord", "ProcessInfo", "ServerInUse", "clear_previous", "process_info", "write_owner"]

OWNER_FILE = "nx-27017.owner"
PID_FILE = "nx-27017.pid"
OWNED_MARK = "hpo_worker.server_process"  # in the command line of a server that watches its owner
STOP_GRACE_S = 10.0


class ServerInUse(RuntimeError):
    """A live server of another owner runs on the data directory; the message names both PIDs and what to do."""


@dataclasses.dataclass(frozen=True)
class OwnerRecord:
    owner_pid: int
    server_pid: int
    port: int
    started: str  # ISO time, for the messages


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    ppid: int
    args: str  # the command line, words joined by spaces


def write_owner(data_dir: Path, record: OwnerRecord) -> None:
    atomic_write_text(data_dir / OWNER_FILE, json.dumps(dataclasses.asdict(record)) + "\n")


def read_owner(data_dir: Path) -> OwnerRecord | None:
    try:
        return OwnerRecord(**json.loads((data_dir / OWNER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_owner(data_dir: Path, server_pid: int) -> None:
    """Removes the record if it is still this server's (a later start may have written its own)."""
    record = read_owner(data_dir)
    if record is not None and record.server_pid == server_pid:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / OWNER_FILE).unlink()


def process_info(pid: int) -> ProcessInfo | None:
    """The live process ``pid`` (None when there is none, or only its zombie), from /proc or else from ``ps``."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()  # after "(comm)", which may hold spaces: state, ppid, ...
        return None if fields[0] in ("Z", "X") else ProcessInfo(int(fields[1]), args)
    result = subprocess.run(["ps", "-o", "stat=,ppid=,args=", "-p", str(pid)], capture_output=True, text=True)
    words = result.stdout.split(None, 2)
    if result.returncode != 0 or len(words) < 2 or words[0].startswith("Z"):
        return None
    return ProcessInfo(int(words[1]), words[2] if len(words) > 2 else "")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pid: int) -> None:
    """SIGTERM (after SIGCONT: a stopped process holds its signals), then SIGKILL; returns once ``pid`` is gone."""
    for sig, wait_s in ((signal.SIGCONT, 0.0), (signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while process_info(pid) is not None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
    raise ServerInUse(f"could not stop the orphan nx-27017 (PID {pid}): stop it by hand (kill -9 {pid})")


def clear_previous(data_dir: Path, db_dir: Path, log: Callable[[str], None]) -> None:
    """Makes way for a new server on ``data_dir``: stops an orphan, refuses (:class:`ServerInUse`) a live owner's."""
    pid = _read_pid(data_dir / PID_FILE)
    info = None if pid is None else process_info(pid)
    if pid is None or info is None or f" {db_dir} " not in f" {info.args} ":
        # No server, or the PID now belongs to another program: nx-27017 would still refuse to start over the file.
        (data_dir / PID_FILE).unlink(missing_ok=True)
        return
    record = read_owner(data_dir)
    owner = record.owner_pid if record is not None and record.server_pid == pid else None
    if owner is not None and info.ppid == owner:
        since = f" since {record.started}" if record is not None else ""
        raise ServerInUse(
            f"the embedded server of {data_dir} (nx-27017, PID {pid}, port {record.port if record else '?'}) belongs "
            f"to PID {owner}{since}, which is still running: another study, driver or `hpo_worker server` uses this "
            f"folder. Wait for it to end or stop it (kill {owner}), or use another output folder"
        )
    if owner is None and OWNED_MARK not in info.args and info.ppid != 1:
        raise ServerInUse(
            f"an nx-27017 (PID {pid}, parent PID {info.ppid}) that hpo_worker did not start runs on {data_dir}: stop "
            f"it (kill {pid}) if nothing uses it, then run again, or use another output folder"
        )
    _stop(pid)
    by = f"PID {owner}, which is gone" if owner is not None else "an owner that is gone"
    log(f"stopped nx-27017 (PID {pid}), left running on {data_dir} by {by}; starting a new server")
