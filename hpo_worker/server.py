"""An embedded MongoDB wire-protocol server (nx-27017, pure Python on SQLite) on a free loopback port.

Used when no MongoDB URL is given, so that a laptop runs the same code path as a cluster with a real MongoDB. The
server keeps its databases in ``<data_dir>/db`` (one SQLite file per database), logs to ``<data_dir>/nx-27017.log``
(its output, one header line per start, to ``nx-27017.out``) and, while it runs, writes its URL to
``<data_dir>/mongo-url`` so that workers find it (``--mongo-file``).

The server belongs to the process that started it: it stops when that process ends, however it ends
(:mod:`hpo_worker.server_process`), and a server left running by an owner that is gone is stopped at the next start
(:mod:`hpo_worker.server_owner`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from hpo_worker.server_owner import PID_FILE, OwnerRecord, ServerInUse, clear_previous, remove_owner, write_owner
from jobs.files import atomic_write_text

__all__ = ["NX_27017_VERSION", "EmbeddedServer", "ServerError", "free_port", "read_url_file", "terminate"]

NX_27017_VERSION = "0.8.1"  # the version the tests ran against; nx-27017 is young and changes fast
URL_FILE = "mongo-url"
OUTPUT_FILE = "nx-27017.out"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_url_file(path: str | Path) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ServerError(
            f"cannot read the MongoDB URL from {path} ({exc.strerror}): start a driver without --mongo or "
            "`python -m hpo_worker server --data-dir DIR` first, or pass --mongo URL"
        ) from exc
    if not text:
        raise ServerError(f"{path} is empty: it should hold one MongoDB URL")
    return text.splitlines()[0].strip()


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("nx-27017")
    except importlib.metadata.PackageNotFoundError:
        return None


def terminate(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited after ``grace_s`` seconds; returns once it has exited."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _check_installed() -> None:
    version = installed_version()
    if version is None:
        raise ServerError(
            f"the embedded server needs nx-27017: pip install nx-27017=={NX_27017_VERSION} neosqlite==1.17.2, "
            "or pass --mongo URL"
        )
    if version != NX_27017_VERSION:
        print(
            f"hpo_worker: warning: nx-27017 {version} is installed; hpo_worker was tested with {NX_27017_VERSION}",
            file=sys.stderr,
        )


class EmbeddedServer:
    """``with EmbeddedServer(data_dir) as server: server.url``: starts nx-27017, stops it at exit."""

    def __init__(
        self, data_dir: str | Path, port: int = 0, host: str = "127.0.0.1", write_url_file: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.write_url_file = write_url_file
        self.log = log or (lambda message: print(f"hpo_worker: {message}", file=sys.stderr, flush=True))
        self.process: subprocess.Popen[bytes] | None = None
        self._owner_pipe: int | None = None  # the write end: open while this object owns a server
        self._output_from = 0

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def url_file(self) -> Path:
        return self.data_dir / URL_FILE

    def start(self, timeout_s: float = 20.0) -> str:
        _check_installed()
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        try:
            clear_previous(self.data_dir, self.data_dir / "db", self.log)
        except ServerInUse as exc:
            raise ServerError(str(exc)) from None
        if not self.port:
            self.port = free_port()
        started = dt.datetime.now().isoformat(timespec="seconds")
        self.process = self._launch(started)
        write_owner(self.data_dir, OwnerRecord(os.getpid(), self.process.pid, self.port, started))
        self._wait_until_listening(timeout_s)
        if self.write_url_file:  # atomically: a worker polling for the file never reads half a URL
            atomic_write_text(self.url_file, self.url + "\n")
        return self.url

    def _launch(self, started: str) -> subprocess.Popen[bytes]:
        """nx-27017 in a process that ends with this one (the pipe; :mod:`hpo_worker.server_process`)."""
        read_end, self._owner_pipe = os.pipe()  # both ends non-inheritable: only the server gets the read end
        command = [
            sys.executable, "-m", "hpo_worker.server_process", "--owner-fd", str(read_end), "--",
            "--host", self.host, "-p", str(self.port), "--data-dir", str(self.data_dir / "db"),
            "--log-file", str(self.data_dir / "nx-27017.log"), "--pid-file", str(self.data_dir / PID_FILE),
        ]  # fmt: skip
        try:
            with (self.data_dir / OUTPUT_FILE).open("ab") as output:
                self._output_from = output.tell()  # this start's output begins here; the lines above are older runs'
                output.write(f"--- {started} nx-27017 on port {self.port}, started by PID {os.getpid()} ---\n".encode())
                output.flush()
                # A session of its own: Ctrl-C (SIGINT to the terminal's process group) reaches the owner and its
                # workers, which still need the server to put their trials back; the pipe stops it after the owner.
                return subprocess.Popen(
                    command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(read_end,)
                )
        finally:
            os.close(read_end)

    def _wait_until_listening(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        status = self.process.returncode
        self.stop()
        what = f"did not listen on {self.host}:{self.port} within {timeout_s:g} s" if status is None else (
            f"exited with status {status} at start")  # fmt: skip
        raise ServerError(f"nx-27017 {what}: {self.output_of_this_start()}")

    def output_of_this_start(self, lines: int = 3) -> str:
        """The last ``lines`` lines nx-27017 printed since this start (never an earlier run's), and the file."""
        path = self.data_dir / OUTPUT_FILE
        try:
            with path.open("rb") as output:
                output.seek(self._output_from)
                text = output.read().decode(errors="replace")
        except OSError:
            text = ""
        # [0] is this start's header; a traceback's ^^^ markers say nothing without the line above them
        printed = [line.strip() for line in text.splitlines()[1:] if line.strip(" ^~\t")]
        return f"{' | '.join(printed[-lines:]) or '(nothing printed)'} (see {path})"

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.write_url_file:
            with contextlib.suppress(FileNotFoundError):
                if self.url_file.read_text().strip() == self.url:
                    self.url_file.unlink()
        terminate(process, timeout_s)
        if self._owner_pipe is not None:
            os.close(self._owner_pipe)
            self._owner_pipe = None
        remove_owner(self.data_dir, process.pid)

    def __enter__(self) -> EmbeddedServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
