"""What a distributed trial's launcher runs under: it stops the launcher's ranks once the worker is gone.

``python -m hpo_worker.rank_guard --owner-fd FD -- LAUNCHER COMMAND...``. The worker (:mod:`hpo_worker.trial`) starts
this process in a session of its own, with the read end of a pipe as ``FD``, and holds the write end. The guard
starts the command in its own process group and waits for it. When the worker exits, however it exits (SIGKILL
included), the kernel closes the write end and the guard reads end-of-file: it sends SIGTERM to the group (the
launcher stops its ranks), and SIGKILL after :data:`STOP_GRACE_S`. The worker's own stop (SIGTERM to the group on
its SIGTERM) reaches the guard too; the guard lets it pass and waits for the command, so that the worker sees the
ranks end. Exit status: the command's (128 + N when signal N ended it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["main", "wait_for_owner_exit"]

STOP_GRACE_S = 10.0


def wait_for_owner_exit(fd: int) -> None:
    """Returns once every write end of the pipe whose read end is ``fd`` is closed: its owner is gone."""
    try:
        while os.read(fd, 1):  # the owner never writes; b"" is end-of-file
            pass
    except OSError:
        pass


def _stop_group_when_owner_exits(fd: int, command: subprocess.Popen[bytes]) -> None:
    wait_for_owner_exit(fd)
    if command.poll() is not None:
        return
    os.killpg(os.getpgrp(), signal.SIGTERM)  # the guard ignores it (main); the launcher and its ranks get it
    deadline = time.monotonic() + STOP_GRACE_S
    while command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if command.poll() is None:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--owner-fd" or args[2] != "--":
        raise SystemExit("usage: python -m hpo_worker.rank_guard --owner-fd FD -- COMMAND...")
    fd = int(args[1])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stop of the group must not end the guard before the ranks
    command = subprocess.Popen(args[3:], restore_signals=True, preexec_fn=_default_sigterm)
    threading.Thread(target=_stop_group_when_owner_exits, args=(fd, command), daemon=True).start()
    code = command.wait()
    return 128 - code if code < 0 else code


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the command must not inherit the guard's ignored SIGTERM


if __name__ == "__main__":
    raise SystemExit(main())
