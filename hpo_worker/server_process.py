"""What runs in the embedded server's process: nx-27017, and a thread that stops it once its owner is gone.

``python -m hpo_worker.server_process --owner-fd FD -- NX_27017_ARGUMENTS...``. The owner (the study, driver or
``hpo_worker server`` that started the server, :class:`hpo_worker.server.EmbeddedServer`) keeps the write end of a
pipe and never writes to it; this process inherits the read end as ``FD``. When the owner exits, however it exits
(SIGKILL of its whole process group included, which the server escapes: it runs in a session of its own), the kernel
closes the write end, the read returns end-of-file, and the server stops itself.

Why a pipe: it needs no polling and no PID (a PID is reused once its process is gone), works on Linux and macOS, and
unlike ``PR_SET_PDEATHSIG`` it follows the owner process, not the thread that happened to start the server.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from hpo_worker.rank_guard import wait_for_owner_exit

__all__ = ["main"]

EXIT_GRACE_S = 10.0  # after SIGTERM, nx-27017's clean exit (it removes its PID file); then the process ends anyway


def watch_owner(fd: int) -> None:
    """Returns only in a process whose owner is gone, after stopping that process."""
    wait_for_owner_exit(fd)
    os.kill(os.getpid(), signal.SIGTERM)  # nx-27017's handler exits cleanly and removes its PID file
    time.sleep(EXIT_GRACE_S)
    os._exit(1)


def parse_argv(argv: Sequence[str]) -> tuple[int, list[str]]:
    if len(argv) < 3 or argv[0] != "--owner-fd" or argv[2] != "--":
        raise SystemExit("usage: python -m hpo_worker.server_process --owner-fd FD -- NX_27017_ARGUMENTS...")
    return int(argv[1]), list(argv[3:])


def main(argv: Sequence[str] | None = None) -> int:
    fd, nx_arguments = parse_argv(sys.argv[1:] if argv is None else argv)
    threading.Thread(target=watch_owner, args=(fd,), name="owner-watch", daemon=True).start()
    from nx_27017.nx_27017 import main as nx_main

    sys.argv = ["nx-27017", *nx_arguments]
    return int(nx_main() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
