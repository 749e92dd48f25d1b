"""The embedded server belongs to the process that started it: a SIGKILL of the owner's process group takes the
server along, a server whose owner is gone is stopped by the next start (which says so), one whose owner lives is
refused with both PIDs, and an error quotes only this start's output (real processes, real signals)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpo_worker.server import EmbeddedServer, ServerError
from tests.processes import ENV, PYTHON, ROOT, processes_mentioning, wait_until_gone


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m hpo_worker server`` in a process group of its own, as a study or a scheduler job would run it;
    yields it and its nx-27017's PID; kills what is left at the end."""
    data = tmp_path / "hpo_data"
    process = subprocess.Popen(
        [PYTHON, "-m", "hpo_worker", "server", "--data-dir", str(data)], cwd=ROOT, env=ENV, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(data / "mongo-url")
        record = json.loads((data / "nx-27017.owner").read_text())
        assert record["owner_pid"] == process.pid
        yield process, int(record["server_pid"])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for line in processes_mentioning(str(data)):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_sigkill_of_the_owners_process_group_takes_the_server_along(
    tmp_path: Path, owner: tuple[subprocess.Popen[str], int]
) -> None:
    process, server_pid = owner
    data = tmp_path / "hpo_data"
    assert any(line.startswith(f"{server_pid} ") for line in processes_mentioning(str(data)))
    os.killpg(process.pid, signal.SIGKILL)  # the server runs in a session of its own: the signal misses it
    process.wait()
    assert wait_until_gone(str(data), timeout_s=15) == [], "nx-27017 outlived its owner"
    assert not (data / "nx-27017.pid").exists(), "the server exited cleanly (it removes its PID file)"
    lines: list[str] = []
    with EmbeddedServer(data, log=lines.append) as server:  # the same folder again: nothing in the way
        assert server.process is not None and server.process.poll() is None
    assert lines == [], lines


def test_a_server_whose_owner_lives_is_refused_naming_both_pids(
    tmp_path: Path, owner: tuple[subprocess.Popen[str], int]
) -> None:
    process, server_pid = owner
    data = tmp_path / "hpo_data"
    url = (data / "mongo-url").read_text()
    with pytest.raises(ServerError) as caught:
        EmbeddedServer(data).start()
    message = str(caught.value)
    assert f"PID {server_pid}" in message and f"belongs to PID {process.pid}" in message, message
    assert f"kill {process.pid}" in message and "another output folder" in message, message
    assert process.poll() is None and (data / "mongo-url").read_text() == url, "the owner's server is untouched"
    assert any(line.startswith(f"{server_pid} ") for line in processes_mentioning(str(data)))


def test_a_server_left_by_a_dead_owner_is_stopped_by_the_next_start(
    tmp_path: Path, owner: tuple[subprocess.Popen[str], int]
) -> None:
    process, server_pid = owner
    data = tmp_path / "hpo_data"
    # A server that could not see its owner die (stopped, hung): it stays behind as an orphan.
    os.kill(server_pid, signal.SIGSTOP)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    assert any(line.startswith(f"{server_pid} ") for line in processes_mentioning(str(data))), "an orphan is left"
    lines: list[str] = []
    with EmbeddedServer(data, log=lines.append) as server:
        assert server.process is not None and server.process.pid != server_pid
        assert not any(line.startswith(f"{server_pid} ") for line in processes_mentioning(str(data)))
    assert lines == [
        f"stopped nx-27017 (PID {server_pid}), left running on {data} by PID {process.pid}, which is gone; "
        "starting a new server"
    ]
    assert wait_until_gone(str(data), timeout_s=15) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_server_hpo_worker_did_not_start_is_refused(tmp_path: Path) -> None:
    data = (tmp_path / "hpo_data").resolve()
    (data / "db").mkdir(parents=True)
    command = [PYTHON, "-c", "import sys; from nx_27017.nx_27017 import main; sys.argv[0] = 'nx-27017'; main()",
               "--host", "127.0.0.1", "-p", str(_free_port()), "--data-dir", str(data / "db"),
               "--log-file", str(data / "hand.log"), "--pid-file", str(data / "nx-27017.pid")]  # fmt: skip
    by_hand = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(data / "nx-27017.pid")
        with pytest.raises(ServerError) as caught:
            EmbeddedServer(data).start()
        assert f"(PID {by_hand.pid}, parent PID {os.getpid()}) that hpo_worker did not start" in str(caught.value)
        assert f"kill {by_hand.pid}" in str(caught.value) and by_hand.poll() is None
    finally:
        by_hand.terminate()
        by_hand.wait(10)


def test_a_failed_start_quotes_only_its_own_output(tmp_path: Path) -> None:
    data = tmp_path / "hpo_data"
    data.mkdir()
    (data / "nx-27017.out").write_text("STALE: NX-27017 is already running (PID: 4242), from an earlier run\n")
    (data / "nx-27017.log").mkdir()  # nx-27017 cannot open its log file: it exits at start
    with pytest.raises(ServerError) as caught:
        EmbeddedServer(data).start(timeout_s=20)
    message = str(caught.value)
    assert "STALE" not in message and "4242" not in message, message
    assert "exited with status 1 at start" in message and "nx-27017.log" in message, message
    assert message.endswith(f"(see {data / 'nx-27017.out'})"), message
    output = (data / "nx-27017.out").read_text()
    assert output.startswith("STALE") and f"started by PID {os.getpid()} ---" in output, "one header per start"
    assert processes_mentioning(str(data)) == [] and not (data / "nx-27017.owner").exists()
