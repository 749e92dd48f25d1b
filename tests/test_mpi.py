"""MPI through mpi4py, with real mpirun ranks: the communicator's collectives, its failures, the MPI rendezvous under a
hostfile and under ``srun --mpi=pmix``, ``run.backend = "mpi"`` in training, and the errors for bad input.

K-FAC's equivalence with one process over this communicator is in ``tests/test_distributed.py``, beside gloo's and
Horovod's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.environment import LaunchError, detect
from launch.rendezvous import meeting_point, rank0_address
from tests.processes import MPI_ENV, PYTHON, ROOT
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture: a real single-node Slurm)

SMOKE = ROOT / "jobs" / "configs" / "smoke.toml"
TIMEOUT = 300
# Open MPI reaches the "hosts" of a hostfile through this agent instead of ssh: each host runs its ranks here, so a
# run over two named hosts is two nodes to Open MPI (a local size of 1 each) on one machine.
# Open MPI's rsh agent: "reach" a host by running here. Each daemon it starts gets a session directory of its own,
# as a real remote node would: mpirun and the "remote" daemon of one job otherwise both create
# /tmp/ompi.<host>.<uid>/jf.<job> at once, and the loser of that race fails with "File exists".
FAKE_SSH = """#!/bin/sh
node=$(mktemp -d "{nodes}/$1.XXXXXX")
shift
OMPI_MCA_orte_tmpdir_base="$node" exec /bin/sh -c "$*"
"""


def _run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env or MPI_ENV, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def _mpirun(np: int, *argv: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["mpirun", "-np", str(np), "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", *extra, PYTHON, *argv]


def _reports(text: str) -> list[dict[str, Any]]:
    reports = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return sorted(reports, key=lambda report: report["rank"])


# --- the communicator -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collectives(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("mpi-collectives")
    result = _run(_mpirun(3, "-m", "tests.mpi_worker", "--out", str(out)))
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(3)]


def test_cpu_tensors_reach_mpi_without_a_copy(collectives: list[dict[str, Any]]) -> None:
    for rank in collectives:
        assert all(rank["shared_memory"].values()), rank["shared_memory"]


def test_allreduce_sums_in_every_dtype(collectives: list[dict[str, Any]]) -> None:
    want = [6.0, 9.0, 12.0, 15.0]  # (1 + 2 + 3) + 3 * index: exact in every dtype, float16 and bfloat16 included
    for rank in collectives:
        assert rank["sums"] == {dtype: want for dtype in ("float64", "float32", "float16", "bfloat16")}


def test_each_owner_gets_the_sum_of_its_own_segment_in_one_call(collectives: list[dict[str, Any]]) -> None:
    total = [6.0 * i for i in range(5)]  # arange(5) times (1 + 2 + 3), split 2, 0, 3 between the ranks
    assert [rank["owners"]["views"] for rank in collectives] == [total[:2], [], total[2:]]
    assert [rank["owners"]["separate"] for rank in collectives] == [[6.0], [6.0, 6.0], [6.0, 6.0, 6.0]]
    for rank in collectives:
        # One reduce-scatter per call at any P (torch.distributed's communicator makes one reduce per owner).
        assert rank["calls"] == {"sum": 4, "factors": 2}
        # The standard cost model, as for the other communicators: n (p-1)/p per reduction, 2 n (p-1)/p per allreduce.
        assert rank["bytes"]["factors"] == pytest.approx((5 * 8 + 6 * 2) * 2 / 3)
        assert rank["bytes"]["sum"] == pytest.approx(2 * 4 * (8 + 4 + 2 + 2) * 2 / 3)


def test_broadcasts_reach_their_group_only(collectives: list[dict[str, Any]]) -> None:
    assert [rank["broadcasts"]["everyone"] for rank in collectives] == [[1.0] * 3] * 3
    assert [rank["broadcasts"]["pair"] for rank in collectives] == [[12.0, 12.0], [11.0, 11.0], [12.0, 12.0]]


def test_the_loops_collectives_run_over_mpi(collectives: list[dict[str, Any]]) -> None:
    for rank in collectives:
        assert rank["loop"] == {"mean_grad": [1.0] * 4, "from_2": [2.0, 2.0], "ints": [[0, 7], [1, 7], [2, 7]]}


def test_gpu_tensors_staged_through_the_host_and_as_is(collectives: list[dict[str, Any]]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: the CPU path above runs the same collectives; the GPU path runs on a GPU machine")
    want = [6.0, 9.0, 12.0, 15.0]
    for rank in collectives:
        gpu = rank["gpu"]
        assert all(values == want for values in gpu["staged"].values()) and gpu["staged"] == gpu["as_is"]


def test_a_rank_that_dies_ends_the_job_and_mpirun_names_it(tmp_path: Path) -> None:
    started = time.monotonic()
    argv = _mpirun(3, "-m", "tests.dist_worker", "--backend", "mpi", "--scenario", "die", "--out", str(tmp_path))
    result = _run(argv)
    assert time.monotonic() - started < 120, "the survivors must not wait for a dead rank"
    assert result.returncode != 0
    # Open MPI's own report: the first process that failed, and its status (rank 1 leaves with os._exit(3)).
    assert "exited with non-zero status" in result.stderr and "Exit code:    3" in result.stderr, result.stderr[-3000:]


def test_a_rank_that_hangs_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    argv = _mpirun(2, "-m", "tests.dist_worker", "--backend", "mpi", "--scenario", "hang", "--timeout", "5")
    started = time.monotonic()
    result = _run([*argv, "--out", str(tmp_path)])
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "CommunicationError" in result.stderr and "did not finish within 0:00:05 on rank 0 of 2" in result.stderr
    assert 5 <= elapsed < 120, "it waited for the timeout, then mpirun ended the hanging rank"


# --- bad input --------------------------------------------------------------------------------------------------


def test_comm_mpi_without_mpi4py_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from distkfac import KFACPreconditioner

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # what an environment without the package gives: ImportError
    with pytest.raises(RuntimeError, match=r"comm='mpi' needs mpi4py .*pip install 'distkfac\[mpi\]'"):
        KFACPreconditioner(torch.nn.Linear(3, 2), comm="mpi")


def _without_mpi_launcher() -> dict[str, str]:
    launcher = ("OMPI_", "PMIX_", "PMI_", "SLURM_", "RANK", "WORLD_SIZE", "MASTER_")
    return {key: value for key, value in MPI_ENV.items() if not key.startswith(launcher)}


def test_comm_mpi_outside_an_mpi_launch_is_refused_before_mpi_starts() -> None:
    code = (
        "import torch; from distkfac import KFACPreconditioner; KFACPreconditioner(torch.nn.Linear(3, 2), comm='mpi')"
    )
    result = _run([PYTHON, "-c", code], env=_without_mpi_launcher())
    assert result.returncode != 0
    assert "comm='mpi' needs an MPI launch (mpirun -np N" in result.stderr and "comm='single'" in result.stderr


def test_run_backend_mpi_outside_an_mpi_launch_is_refused(tmp_path: Path) -> None:
    argv = [PYTHON, "-m", "jobs.train", "--config", str(SMOKE), f"run.out_dir={tmp_path}", "run.backend=mpi"]
    result = _run(argv, env=_without_mpi_launcher())
    assert result.returncode != 0
    assert "backend 'mpi' needs an MPI launcher" in result.stderr and "'single'" in result.stderr, result.stderr


def test_several_nodes_without_mpi4py_or_master_addr_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    env = detect({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert env.master_addr == ""  # nothing names rank 0's host: MPI has to say it
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(LaunchError, match=r"install mpi4py .* or set MASTER_ADDR"):
        meeting_point(env, {})


# --- rank 0's address -------------------------------------------------------------------------------------------


def test_rank0_address_is_loopback_when_every_rank_shares_its_host() -> None:
    assert rank0_address(["n1", "n1", "n1"], resolve=lambda host: pytest.fail("no lookup needed")) == "127.0.0.1"


def test_rank0_address_skips_loopback_addresses_of_its_host_name() -> None:
    addresses = {"n1": ["127.0.1.1", "::1", "10.0.0.5"]}
    assert rank0_address(["n1", "n2"], resolve=addresses.__getitem__) == "10.0.0.5"


def test_rank0_address_falls_back_to_the_route_towards_another_host() -> None:
    def route(host: str) -> str:
        if host == "n2":
            raise OSError("unreachable")
        return "192.168.1.7"

    assert rank0_address(["n1", "n2", "n3"], resolve=lambda host: ["127.0.1.1"], route_to=route) == "192.168.1.7"
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        rank0_address(["n1", "n2"], resolve=lambda host: ["127.0.1.1"], route_to=route)


# --- the rendezvous under real launchers -------------------------------------------------------------------------


@pytest.fixture
def two_hosts(tmp_path: Path) -> tuple[str, ...]:
    """mpirun arguments for a hostfile of two hosts, nodea and nodeb, that are this machine."""
    agent = tmp_path / "fake-ssh"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    agent.write_text(FAKE_SSH.format(nodes=nodes))
    agent.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodea slots=1\nnodeb slots=1\n")
    # gds=hash: the two "nodes" share /tmp, where PMIx's shared-memory store of one would meet the other's.
    # routed=direct: each daemon talks to mpirun itself (Open MPI asks for it when its routing tree fails here).
    agent_args = ("--mca", "plm_rsh_agent", str(agent), "--mca", "routed", "direct")
    return ("--hostfile", str(hostfile), *agent_args, "-x", "PMIX_MCA_gds=hash")


def test_hostfile_run_without_master_addr_meets_through_mpi(two_hosts: tuple[str, ...]) -> None:
    assert "MASTER_ADDR" not in MPI_ENV and "MASTER_PORT" not in MPI_ENV
    result = _run(_mpirun(2, "-m", "launch", "env", "--init", extra=two_hosts))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = _reports(result.stdout)
    assert [(r["rank"], r["local_world_size"], r["launcher"]) for r in reports] == [
        (0, 1, "openmpi"),
        (1, 1, "openmpi"),
    ]
    assert {r["master_addr"] for r in reports} == {""}, "the environment alone cannot name rank 0's host"
    assert len({r["rendezvous"] for r in reports}) == 1 and reports[0]["rendezvous"].startswith("mpi:")
    assert all(r["allreduce_sum"] == 3 for r in reports)


def test_two_hostfile_trainings_at_once_do_not_collide(two_hosts: tuple[str, ...], tmp_path: Path) -> None:
    runs = [tmp_path / "first", tmp_path / "second"]
    argv = [
        _mpirun(2, "-m", "jobs.train", "--config", str(SMOKE), f"run.out_dir={out}", extra=two_hosts) for out in runs
    ]
    procs = [subprocess.Popen(a, env=MPI_ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True) for a in argv]
    errors = [proc.communicate(timeout=TIMEOUT)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n---\n".join(e[-3000:] for e in errors)
    meetings = []
    for out in runs:
        records = [json.loads((out / "ranks" / f"rank{rank}.json").read_text()) for rank in range(2)]
        assert {(r["launcher"], r["distributed"]) for r in records} == {("openmpi", "torch")}
        assert len({r["rendezvous"] for r in records}) == 1 and records[0]["rendezvous"].startswith("mpi:")
        meetings.append(records[0]["rendezvous"])
        assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-step00000016"
    assert meetings[0] != meetings[1], "each run's rank 0 bound a port of its own"


def test_master_addr_and_port_or_launch_rendezvous_still_win_over_mpi() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    both = _run(
        _mpirun(2, "-m", "launch", "env", "--init", extra=("-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}"))
    )
    assert both.returncode == 0, both.stderr[-3000:]
    assert {r["rendezvous"] for r in _reports(both.stdout)} == {f"environment:127.0.0.1:{port}"}
    plain = _run(_mpirun(2, "-m", "launch", "env", "--init", extra=("-x", "LAUNCH_RENDEZVOUS=environment")))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert {r["rendezvous"].rsplit(":", 1)[0] for r in _reports(plain.stdout)} == {"environment:127.0.0.1"}
    only_port = _run(_mpirun(2, "-m", "launch", "env", "--init", extra=("-x", f"MASTER_PORT={port}")))
    assert only_port.returncode == 0, only_port.stderr[-3000:]
    assert {r["rendezvous"] for r in _reports(only_port.stdout)} == {f"mpi:127.0.0.1:{port}"}  # MPI names the host


def test_run_backend_mpi_trains_like_gloo(tmp_path: Path) -> None:
    finals = {}
    for backend in ("mpi", "gloo"):
        out = tmp_path / backend
        argv = ["-m", "jobs.train", "--config", str(SMOKE), f"run.out_dir={out}", f"run.backend={backend}"]
        result = _run(_mpirun(2, *argv, "optim.name=kfac", "run.ddp=false"))
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads((out / "ranks" / f"rank{rank}.json").read_text()) for rank in range(2)]
        assert {r["distributed"] for r in records} == {"mpi" if backend == "mpi" else "torch"}
        state = torch.load(out / "checkpoints" / "ckpt-step00000016.pt", weights_only=False)["model"]
        finals[backend] = state
    for name, tensor in finals["gloo"].items():
        torch.testing.assert_close(finals["mpi"][name], tensor, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_srun_pmix_trains_with_the_mpi_rendezvous_or_over_mpi(tmp_path: Path, backend: str) -> None:
    out, log = tmp_path / "run", tmp_path / "job.log"
    command = [PYTHON, "-m", "launch", "submit", "--config", str(SMOKE), "--scheduler", "slurm",
               "--tasks-per-node", "2", "--walltime", "00:10:00", "--chdir", str(ROOT), "--python", PYTHON,
               "--output", str(log), "--error", str(log), "--wait",
               f"run.out_dir={out}", f"run.backend={backend}"]  # fmt: skip
    result = _run(command)
    where = f"{result.stderr[-2000:]}\n--- job log:\n{log.read_text()[-4000:] if log.exists() else ''}"
    assert result.returncode == 0, where
    records = [json.loads((out / "ranks" / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert {r["launcher"] for r in records} == {"pmix"}, where
    if backend == "gloo":
        assert len({r["rendezvous"] for r in records}) == 1 and records[0]["rendezvous"].startswith("mpi:"), where
    else:
        assert {(r["distributed"], r["rendezvous"]) for r in records} == {("mpi", "none")}, where
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-step00000016"
    assert os.path.exists(out / "metrics.jsonl")
