"""Where the model reads and writes, the world sizes it projects, and a MiB."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs"
PEERS_DIR = ROOT / "build" / "peers"
WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MIB = 2**20
