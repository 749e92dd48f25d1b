"""A real nx-27017 server process (MongoDB wire protocol, pure Python) on a free loopback port, for the tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "mongo_server"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mongo_server(data_dir: Path, timeout_s: float = 20.0) -> Iterator[str]:
    """Starts ``nx-27017`` with its own data directory; yields its URL; stops it (and waits for it) at exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = Path(sys.executable).with_name("nx-27017")
    command = [
        str(exe),
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--data-dir",
        str(data_dir / "db"),
        "--log-file",
        str(data_dir / "nx.log"),
        "--pid-file",
        str(data_dir / "nx.pid"),
    ]
    out = (data_dir / "nx.out").open("wb")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nx-27017 exited with {process.returncode}: {(data_dir / 'nx.out').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nx-27017 did not listen on port {port}") from None
                time.sleep(0.05)
        yield f"mongodb://127.0.0.1:{port}/hpo"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()
