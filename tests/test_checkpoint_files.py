"""Checkpoint files on real runs: a corrupt newest checkpoint (truncated, zeroed, a file deleted, on one rank or on
one of two ranks) is reported by name and set aside, the run resumes from the one before and ends bit for bit like
the uninterrupted run; when no checkpoint is valid the run is refused (exit status 2) and nothing is moved."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import manifest_file, rank_file
from jobs.metrics import read_metrics
from jobs.outcome import EXIT_BAD_CONFIG
from jobs.train import main
from tests.processes import ENV, PYTHON, ROOT
from tests.test_train import final_model, without_timing

SMOKE = ROOT / "jobs" / "configs" / "smoke.toml"
# K-FAC, so that every rank's file holds state the run needs (its factors); checkpoints every 4 steps, 2 kept.
COMMON = ("optim.name=kfac", "optim.momentum=0.5", "run.checkpoint_every=4", "kfac.inv_update_steps=3")
STOP_AT = 13  # as if killed after step 13: checkpoints 8 and 12 are on disk


def train(out_dir: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["--config", str(SMOKE), f"run.out_dir='{out_dir}'", *COMMON, *overrides]
    return main([*argv, "--resume"] if resume else argv)


def assert_same_end(whole: Path, parts: Path) -> None:
    a, b = final_model(whole), final_model(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(read_metrics(parts)) == without_timing(read_metrics(whole))


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, once for the module."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train(out) == 0
    return out


def stopped(out: Path) -> Path:
    assert train(out, f"run.stop_after_steps={STOP_AT}") == 0
    return out / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


Fault = Callable[[Path], None]
FAULTS: dict[str, tuple[str, Fault, str]] = {
    # what is damaged, how, and what the message says about it
    "truncated": (".rank0.pt", truncate, r"ckpt-step00000012\.rank0\.pt: size \d+, expected \d+"),
    "zeroed": (".pt", zero, r"ckpt-step00000012\.pt: its bytes differ from those written \(sha256 mismatch"),
    "deleted": (".pt", Path.unlink, r"ckpt-step00000012\.pt: missing"),
    "manifest deleted": (".manifest.json", Path.unlink, r"ckpt-step00000012\.manifest\.json: missing \(its writing"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_resumes_to_the_same_end(
    tmp_path: Path, whole: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stopped(tmp_path / "parts")
    suffix, damage, problem = FAULTS[fault]
    damaged = folder / f"ckpt-step00000012{suffix}"
    damage(damaged)
    kept = {p.name: p.read_bytes() for p in folder.glob("ckpt-step00000012.*")}
    capsys.readouterr()

    assert train(tmp_path / "parts", resume=True) == 0
    err = capsys.readouterr().err
    aside = folder / "corrupt" / "ckpt-step00000012"
    assert f"checkpoint ckpt-step00000012 in {folder} is corrupt (" in err
    assert f"): moved to {aside} (inspect or delete it)" in err
    assert re.search(problem, err), err
    assert "resuming from ckpt-step00000008: 4 steps will be trained again" in err
    assert "resuming after step 8" in err
    # Nothing lost: the corrupt files are kept byte for byte, and pruning did not touch them.
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == kept
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "ckpt-step00000012.manifest.json", "ckpt-step00000012.pt", "ckpt-step00000012.rank0.pt",
        "ckpt-step00000016.manifest.json", "ckpt-step00000016.pt", "ckpt-step00000016.rank0.pt", "latest",
    ]  # fmt: skip
    assert_same_end(whole, tmp_path / "parts")


def test_no_valid_checkpoint_is_refused_naming_the_folder_and_nothing_is_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stopped(tmp_path / "run")
    truncate(folder / "ckpt-step00000012.pt")
    (folder / "ckpt-step00000008.rank0.pt").unlink()
    before = sorted(p.name for p in folder.iterdir())
    metrics = read_metrics(tmp_path / "run")
    summary = (tmp_path / "run" / "summary.json").read_text()
    capsys.readouterr()

    assert train(tmp_path / "run", resume=True) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert f"no valid checkpoint in {folder} to resume from (ckpt-step00000012: ckpt-step00000012.pt: size " in err
    assert "; ckpt-step00000008: ckpt-step00000008.rank0.pt: missing); nothing was trained or moved" in err
    assert f"move {folder} away (keep it to inspect), or choose another run.out_dir" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before
    assert read_metrics(tmp_path / "run") == metrics
    assert (tmp_path / "run" / "summary.json").read_text() == summary


def test_a_checkpoint_without_a_manifest_resumes_unverified_when_latest_names_it(
    tmp_path: Path, whole: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stopped(tmp_path / "parts")  # as the code before manifests left a run
    for step in (8, 12):
        manifest_file(folder, f"ckpt-step{step:08d}").unlink()
    capsys.readouterr()
    assert train(tmp_path / "parts", resume=True) == 0
    err = capsys.readouterr().err
    unverified = "checkpoint ckpt-step00000012 has no manifest (written before checkpoints were verified)"
    assert f"{unverified}: not verified" in err
    assert "resuming after step 12" in err
    assert_same_end(whole, tmp_path / "parts")


def test_a_manifest_lists_every_file_with_its_size_and_sha256(tmp_path: Path) -> None:
    folder = stopped(tmp_path / "run")
    manifest = json.loads(manifest_file(folder, "ckpt-step00000012").read_text())
    assert manifest["checkpoint"] == "ckpt-step00000012"
    assert sorted(manifest["files"]) == ["ckpt-step00000012.pt", "ckpt-step00000012.rank0.pt"]
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(PYTHON).with_name("torchrun")), "--standalone", "--nproc-per-node=2"]
    argv = [*command, "-m", "jobs.train", "--config", str(SMOKE), *COMMON, "run.checkpoint_every=3", *args]
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_two_ranks_one_rank_file_deleted_resume_from_the_checkpoint_before(tmp_path: Path) -> None:
    whole = _torchrun(f"run.out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    parts = tmp_path / "parts"
    stop = _torchrun(f"run.out_dir={parts}", "run.stop_after_steps=7")  # checkpoints 3 and 6
    assert stop.returncode == 0, stop.stderr[-3000:]
    folder = parts / "checkpoints"
    rank_file(folder, "ckpt-step00000006", 1).unlink()  # rank 1's file only: rank 0's are intact

    resumed = _torchrun(f"run.out_dir={parts}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint ckpt-step00000006 in {folder} is corrupt (ckpt-step00000006.rank1.pt: missing)" in (
        resumed.stderr
    )
    assert "resuming from ckpt-step00000003: 3 steps will be trained again" in resumed.stderr
    records = [json.loads((parts / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in records] == [3, 3]  # both ranks started from the same checkpoint
    assert sorted(p.name for p in (folder / "corrupt" / "ckpt-step00000006").iterdir()) == [
        "ckpt-step00000006.manifest.json", "ckpt-step00000006.pt", "ckpt-step00000006.rank0.pt"
    ]  # fmt: skip
    assert_same_end(tmp_path / "whole", parts)
