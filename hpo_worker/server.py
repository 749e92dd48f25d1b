"""An embedded MongoDB wire-protocol server (nx-27017, pure Python on SQLite) on a free loopback port.

Used when no MongoDB URL is given, so that a laptop runs the same code path as a cluster with a real MongoDB. The
server keeps its databases in ``<data_dir>/db`` (one SQLite file per database), logs to ``<data_dir>/nx-27017.log``
and, while it runs, writes its URL to ``<data_dir>/mongo-url`` so that workers find it (``--mongo-file``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from jobs.files import atomic_write_text

__all__ = ["NX_27017_VERSION", "EmbeddedServer", "ServerError", "free_port", "read_url_file", "terminate"]

NX_27017_VERSION = "0.8.1"  # the version the tests ran against; nx-27017 is young and changes fast
URL_FILE = "mongo-url"


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


class EmbeddedServer:
    """``with EmbeddedServer(data_dir) as server: server.url``: starts nx-27017, stops it at exit."""

    def __init__(self, data_dir: str | Path, port: int = 0, host: str = "127.0.0.1", write_url_file: bool = True):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.write_url_file = write_url_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def url_file(self) -> Path:
        return self.data_dir / URL_FILE

    def start(self, timeout_s: float = 20.0) -> str:
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
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        command = [
            sys.executable,
            "-c",
            "import sys; from nx_27017.nx_27017 import main; sys.argv[0] = 'nx-27017'; sys.exit(main())",
            "--host",
            self.host,
            "-p",
            str(self.port),
            "--data-dir",
            str(self.data_dir / "db"),
            "--log-file",
            str(self.data_dir / "nx-27017.log"),
            "--pid-file",
            str(self.data_dir / "nx-27017.pid"),
        ]
        log = (self.data_dir / "nx-27017.out").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"nx-27017 exited with status {self.process.returncode} at start: see "
                    f"{self.data_dir / 'nx-27017.out'} (port {self.port} in use?)"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(
                        f"nx-27017 did not listen on {self.host}:{self.port} within {timeout_s:g} s"
                    ) from None
                time.sleep(0.05)
        if self.write_url_file:  # atomically: a worker polling for the file never reads half a URL
            atomic_write_text(self.url_file, self.url + "\n")
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.write_url_file:
            with contextlib.suppress(FileNotFoundError):
                if self.url_file.read_text().strip() == self.url:
                    self.url_file.unlink()
        terminate(process, timeout_s)

    def __enter__(self) -> EmbeddedServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
