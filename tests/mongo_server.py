"""A real nx-27017 server process (MongoDB wire protocol, pure Python) on a free loopback port, for the tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MongoProcess", "free_port", "mongo_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MongoProcess:
    """One nx-27017 process on a fixed port and data directory, which a test can kill, pause and start again."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir, self.port = data_dir, port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/hpo"

    def start(self, timeout_s: float = 20.0) -> str:
        exe = Path(sys.executable).with_name("nx-27017")
        command = [
            str(exe), "--host", "127.0.0.1", "-p", str(self.port), "--data-dir", str(self.data_dir / "db"),
            "--log-file", str(self.data_dir / "nx.log"), "--pid-file", str(self.data_dir / "nx.pid"),
        ]  # fmt: skip
        with (self.data_dir / "nx.out").open("ab") as out:
            self.process = process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nx-27017 exited with {process.returncode}: {(self.data_dir / 'nx.out').read_text()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self.url
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nx-27017 did not listen on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node failure would: no shutdown, whatever was in flight is lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused one cannot handle SIGTERM
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def mongo_server(data_dir: Path, timeout_s: float = 20.0) -> Iterator[str]:
    """Starts ``nx-27017`` with its own data directory; yields its URL; stops it (and waits for it) at exit."""
    server = MongoProcess(data_dir)
    try:
        yield server.start(timeout_s)
    finally:
        server.stop()
