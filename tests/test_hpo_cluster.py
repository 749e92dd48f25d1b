"""hpo_worker trials as distributed runs (mpirun, srun) and workers started as a Slurm job array by `launch submit`.

Everything is real: nx-27017, mpirun ranks, and a single-node Slurm (tests/slurm_cluster.py) whose array tasks run
`python -m hpo_worker worker --launcher srun --ranks 2`, so that every trial is a 2-rank job step.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpo_worker.store import TrialState
from tests.processes import MPI_ENV, PYTHON, ROOT
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture: a real single-node Slurm)
from tests.test_hpo import _check_complete, _driver, _files, _finish, _start, _wait_for, _worker


def _rank_records(trial_dir: Path, world: int) -> list[dict[str, Any]]:
    records = [json.loads((trial_dir / "run" / "ranks" / f"rank{r}.json").read_text()) for r in range(world)]
    assert not (trial_dir / "run" / "ranks" / f"rank{world}.json").exists()
    assert {r["world_size"] for r in records} == {world}
    assert len({r["pid"] for r in records}) == world, "each rank is its own process"
    return records


def test_worker_runs_each_trial_as_mpirun_ranks(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "mpi", 2, "--queue-size", "2")
    worker = _worker(mongo, tmp_path, "--idle-timeout", "6", "--launcher", "mpirun", "--ranks", "2",
                     "--launcher-args", "-x OMP_NUM_THREADS -x PYTHONPATH")  # fmt: skip
    rc, out = _finish(driver, 120)
    assert rc == 0, out
    rc, out = _finish(worker, 60)
    assert rc == 0 and "trials as 2 rank(s) under mpirun" in out, out
    for doc in _check_complete(db, "mpi", 2):
        trial_dir = Path(doc["result"]["out_dir"])
        assert {r["launcher"] for r in _rank_records(trial_dir, 2)} == {"openmpi"}
        assert (trial_dir / "command.sh").read_text().startswith("mpirun -np 2 ")
        summary = json.loads((trial_dir / "run" / "summary.json").read_text())
        assert doc["result"]["test_loss"] == pytest.approx(summary["test_loss"])
        assert doc["result"]["loss"] == pytest.approx(summary["test_loss"])


def test_sigterm_stops_every_rank_and_requeues(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "mpiterm", 1, "--queue-size", "1", steps=20000)
    worker = _worker(mongo, tmp_path, "--idle-timeout", "30", "--launcher", "mpirun", "--ranks", "2")
    doc = _wait_for(lambda: db.jobs.find_one({"exp_key": "mpiterm", "state": TrialState.RUNNING}), what="a trial")
    trial_dir = tmp_path / "runs" / "mpiterm" / f"trial{doc['tid']}.{doc['version']}"
    # Each rank writes its record on its own schedule: wait for both, not only the last one.
    ranks = trial_dir / "run" / "ranks"
    _wait_for(lambda: all((ranks / f"rank{r}.json").exists() for r in range(2)), 60, "both ranks training")
    pids = [r["pid"] for r in _rank_records(trial_dir, 2)]
    worker.send_signal(signal.SIGTERM)
    rc, out = _finish(worker, 30)
    assert rc == 143 and "back in the queue" in out, out
    _wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), 15, "the ranks to exit")
    again = db.jobs.find_one({"exp_key": "mpiterm"})
    assert again["state"] == TrialState.NEW and again["owner"] is None
    driver.kill()
    driver.wait()


def test_a_failing_launched_trial_is_an_error_with_its_stderr(mongo: str, db: Any, tmp_path: Path) -> None:
    # A global batch of 65 does not split over 2 ranks: jobs.train exits 2 on every rank before training.
    config, space = _files(tmp_path)
    config.write_text(config.read_text().replace("batch_size = 64", "batch_size = 65"))
    driver = _start("driver", "--mongo", mongo, "--exp", "bad", "--space", str(space), "--config", str(config),
                    "--max-evals", "1", "--poll", "0.1", cwd=tmp_path)  # fmt: skip
    worker = _worker(mongo, tmp_path, "--idle-timeout", "6", "--launcher", "mpirun", "--ranks", "2")
    rc, out = _finish(driver, 60)
    assert rc == 0, out
    _finish(worker, 30)
    doc = db.jobs.find_one({"exp_key": "bad"})
    assert doc is not None and doc["state"] == TrialState.ERROR, doc
    assert "exited with status 2" in doc["misc"]["error"][1] and "65" in doc["misc"]["error"][1], doc["misc"]


@pytest.mark.usefixtures("slurm_cluster")
def test_job_array_of_workers_runs_trials_as_srun_steps(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "array", 4, "--queue-size", "2")
    worker = shlex.join([PYTHON, "-m", "hpo_worker", "worker", "--mongo", mongo, "--exp", "array",
                         "--workdir", str(tmp_path / "runs"), "--idle-timeout", "5", "--poll", "0.05",
                         "--launcher", "srun", "--ranks", "2"])  # fmt: skip
    log = tmp_path / "array-%A_%a.log"
    submit = [PYTHON, "-m", "launch", "submit", "--scheduler", "slurm", "--array", "2", "--launcher", "none",
              "--tasks-per-node", "2", "--walltime", "00:10:00", "--chdir", str(ROOT), "--output", str(log),
              "--command", worker, "--wait"]  # fmt: skip
    result = subprocess.run(submit, cwd=ROOT, env=MPI_ENV, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("array-*.log")))
    assert result.returncode == 0, f"{result.stderr}\n{logs}"
    rc, out = _finish(driver, 60)
    assert rc == 0, out
    docs = _check_complete(db, "array", 4)
    jobs = {d["owner"].split(":job=")[1] for d in docs}
    assert {job.rsplit("_", 1)[1] for job in jobs} == {"0", "1"}, f"both array tasks ran trials: {jobs}\n{logs}"
    for doc in docs:
        records = _rank_records(Path(doc["result"]["out_dir"]), 2)
        assert {r["launcher"] for r in records} <= {"slurm", "pmix"}, records
        assert doc["result"]["status"] == "ok"
    assert len(list(tmp_path.glob("array-*.log"))) == 2  # sbatch --wait returned: both tasks exited when idle
