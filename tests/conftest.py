"""Fixtures shared by several test modules: a real MongoDB wire-protocol server (nx-27017) and a client of it, and
float64 as the default dtype (the K-FAC contract is checked in float64)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.mongo_server import mongo_server


@pytest.fixture
def mongo(tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh nx-27017 server process on a free loopback port (stopped after the test)."""
    with mongo_server(tmp_path / "mongo") as url:
        yield url


@pytest.fixture
def db(mongo: str) -> Iterator[Any]:
    """The server's default database, through pymongo."""
    import pymongo

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo, serverSelectionTimeoutMS=5000)
    yield client.get_default_database()
    client.close()


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype for the test; the previous default is restored for the other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
