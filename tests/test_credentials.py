"""Credentials stay secret: ``mask_url`` masks every MongoDB URL pymongo accepts (and those it refuses), and a real
study whose MongoDB password holds ``/``, ``@`` and ``:`` keeps it out of ``ps`` (command lines and environments),
its logs, its reports and the store, while every process logs in with it.

nx-27017 has no authentication (a login fails), so the study talks to it through a proxy that accepts SASL PLAIN
logins and records them (tests/mongo_auth_proxy.py): the password really goes over the wire, as to a real MongoDB.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from hpo_worker.store import StoreError, connect, mask_url
from tests.processes import ENV, PYTHON, ROOT, processes_mentioning

PASSWORD = "s3/cr@t:pw"  # one of each character a naive mask gets wrong
ENCODED = quote(PASSWORD, safe="")  # s3%2Fcr%40t%3Apw


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            f"mongodb://alice:{ENCODED}@db.example:27017/hpo?tls=true",
            "mongodb://alice:***@db.example:27017/hpo?tls=true",
        ),
        (
            f"mongodb://alice:{ENCODED}@db1:27017,db2:27018/hpo?replicaSet=rs0&authSource=admin&appname=a@b",
            "mongodb://alice:***@db1:27017,db2:27018/hpo?replicaSet=rs0&authSource=admin&appname=a@b",
        ),
        (f"mongodb+srv://alice:{ENCODED}@cluster0.example.net/hpo", "mongodb+srv://alice:***@cluster0.example.net/hpo"),
        (f"mongodb://alice:{PASSWORD}@db:27017/hpo", "mongodb://alice:***@db:27017/hpo"),  # raw: pymongo refuses it
        ("mongodb://alice:pa/ss@db/hpo", "mongodb://alice:***@db/hpo"),
        ("mongodb://alice:pa@ss@db/hpo", "mongodb://alice:***@db/hpo"),
        ("mongodb://alice:pa:ss@db/hpo", "mongodb://alice:***@db/hpo"),
        ("mongodb://alice:@db/hpo", "mongodb://alice:***@db/hpo"),
        ("mongodb://alice@db/hpo", "mongodb://alice@db/hpo"),
        ("mongodb://db:27017/hpo?appname=x@y", "mongodb://db:27017/hpo?appname=x@y"),
        ("mongodb://db:27017/", "mongodb://db:27017/"),
    ],
)
def test_mask_url_masks_every_password_and_keeps_the_rest(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_url(masked) == masked, "masking twice changes nothing"


def test_mask_url_masks_every_url_in_a_message() -> None:
    text = f"cannot reach mongodb://a:{PASSWORD}@h1/x (nor mongodb://b:{ENCODED}@h2/y): check the URL"
    assert mask_url(text) == "cannot reach mongodb://a:***@h1/x (nor mongodb://b:***@h2/y): check the URL"


@pytest.mark.parametrize("password", [PASSWORD, ENCODED])
def test_connection_errors_never_show_the_password(password: str) -> None:
    with pytest.raises(StoreError) as caught:
        connect(f"mongodb://alice:{password}@127.0.0.1:9/hpo", timeout_s=0.2)
    assert "alice:***@127.0.0.1:9" in str(caught.value)
    for secret in (PASSWORD, ENCODED, "cr@t", "s3/"):
        assert secret not in str(caught.value)
    command = [PYTHON, "-m", "hpo_worker", "report", "--exp", "x", "--timeout", "0.2", "--mongo",
               f"mongodb://alice:{password}@127.0.0.1:9/hpo"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "alice:***@" in result.stderr, result.stderr
    assert PASSWORD not in result.stderr and ENCODED not in result.stderr and "cr@t" not in result.stderr


STUDY = """
[study]
name = "secret"
base_config = "base.toml"
optimizers = ["sgd"]
batch_sizes = [32]
target_accuracy = 0.6
max_steps = 20
eval_every_steps = 5
[tune]
trials = 2
workers = 1
spaces = { sgd = "space.toml" }
"""


class ProcessTable:
    """Reads ``ps`` (every process's command line and environment) until stopped, keeping the lines of this test's
    processes: what any user (command lines) or this user (environments) could have seen while the study ran."""

    def __init__(self, mention: str) -> None:
        self.mention, self.lines, self.stop = mention, set[str](), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            table = subprocess.run(["ps", "-e", "e", "-ww", "-o", "pid=,args="], capture_output=True, text=True)
            self.lines.update(line for line in table.stdout.splitlines() if self.mention in line)


def _secrets_in(text: str) -> list[str]:
    return [secret for secret in (PASSWORD, ENCODED, "cr@t", "cr%40t") if secret in text]


def test_a_study_keeps_a_password_out_of_ps_logs_reports_and_the_store(tmp_path: Path, mongo: str, db: Any) -> None:
    from tests.mongo_auth_proxy import auth_proxy
    from tests.test_study import BASE, SPACE

    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "study.toml").write_text(STUDY)
    out = tmp_path / "out"
    secret_dir = tmp_path / "secret"  # the user's own file (as ~/.hpo-url in docs/hpo.md): the only place it may be
    secret_dir.mkdir()
    upstream_port = int(mongo.rsplit(":", 1)[1].split("/")[0])
    with auth_proxy(upstream_port) as proxy:
        url_file = secret_dir / "hpo-url"
        url_file.write_text(f"mongodb://hpo:{ENCODED}@127.0.0.1:{proxy.port}/hpo?authMechanism=PLAIN\n")
        url_file.chmod(0o600)
        command = [PYTHON, "-m", "study", "scaling", "--config", str(tmp_path / "study.toml"), "--out", str(out),
                   "--mongo-file", str(url_file)]  # fmt: skip
        table = ProcessTable(str(tmp_path))
        table.thread.start()
        study = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        modes = set()
        while study.poll() is None:
            if (out / "mongo-url").exists():
                modes.add(stat.S_IMODE((out / "mongo-url").stat().st_mode))
            time.sleep(0.05)
        stdout, stderr = study.communicate(timeout=600)
        table.stop.set()
        table.thread.join()
        logins = list(proxy.logins)
    assert study.returncode == 0, stderr[-4000:]
    assert "mongodb://hpo:***@127.0.0.1" in stderr, "the study names the server, with the password masked"
    # Every process logged in with the password: the study, its driver and its worker (the report reads through
    # the study's own connection).
    assert len(logins) >= 3 and all(login == f"\0hpo\0{PASSWORD}".encode() for login in logins), logins
    assert modes == {0o600}, f"the children's URL file must be private to the user, was {sorted(map(oct, modes))}"
    assert not (out / "mongo-url").exists(), "removed when the tuning ends"

    seen = "\n".join(sorted(table.lines))
    assert "hpo_worker driver" in seen and "hpo_worker worker" in seen, "ps was read while the children ran"
    assert _secrets_in(seen) == [], [line for line in table.lines if _secrets_in(line)]
    assert _secrets_in(stdout + stderr) == []
    files = [path for path in tmp_path.rglob("*") if path.is_file() and secret_dir not in path.parents]
    assert any(path.name == "report.md" for path in files) and any(path.name == "runs.csv" for path in files)
    leaks = [str(path) for path in files if _secrets_in(path.read_bytes().decode("latin-1"))]
    assert leaks == [], f"the password is in {leaks}"
    client = db.client
    stored = [doc for name in client.list_database_names() for coll in client[name].list_collection_names()
              for doc in client[name][coll].find()]  # fmt: skip
    assert len(stored) > 2 and _secrets_in(json.dumps(stored, default=str)) == []
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 2
    assert processes_mentioning(str(out)) == [], "no driver or worker is left"
    assert os.stat(url_file).st_mode & 0o077 == 0
