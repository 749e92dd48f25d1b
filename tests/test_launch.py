"""launch: detection under real launchers (torchrun, mpirun, srun --mpi=pmix, mpirun under qsub), detection from
the variables of launchers that cannot run here, job scripts, and submission to a real single-node Slurm."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from launch.cli import main
from launch.environment import Environment, LaunchError, detect, expand_first_host
from launch.submit import wait_for_job
from tests.processes import ENV, MPI_ENV, PYTHON, ROOT
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture: a real single-node Slurm)

VENV_BIN = Path(PYTHON).parent
TIMEOUT = 180


def _run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env or ENV, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def _reports(text: str) -> list[dict[str, Any]]:
    """The JSON lines `python -m launch env` printed (one per rank), by rank."""
    reports = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return sorted(reports, key=lambda report: report["rank"])


def _check_ranks(reports: list[dict[str, Any]], world: int, launcher: str, where: str) -> None:
    assert [r["rank"] for r in reports] == list(range(world)), where
    for report in reports:
        assert report["world_size"] == world, where
        assert report["local_rank"] == report["rank"], where  # one node: local rank is the rank
        assert report["local_world_size"] == world, where
        assert report["launcher"] == launcher, where
        assert report["allreduce_sum"] == world * (world + 1) // 2, where
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1, f"ranks disagree on the master: {where}"


# --- detection under the launchers that run here ----------------------------------------------------------------


def test_torchrun_ranks_detect_themselves_and_allreduce() -> None:
    torchrun = str(VENV_BIN / "torchrun")
    result = _run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "launch", "env", "--init"])
    assert result.returncode == 0, result.stderr[-3000:]
    reports = _reports(result.stdout)
    _check_ranks(reports, 2, "torchrun", result.stdout + result.stderr[-2000:])
    assert reports[0]["scheduler"] is None and reports[0]["job_id"] is None


def test_mpirun_ranks_detect_themselves_and_allreduce() -> None:
    argv = ["mpirun", "-np", "2", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", PYTHON, "-m", "launch", "env", "--init"]
    result = _run(argv, MPI_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = _reports(result.stdout)
    _check_ranks(reports, 2, "openmpi", result.stdout + result.stderr[-2000:])
    # No scheduler and no MASTER_PORT: the port comes from mpirun's job id, not the fixed default.
    assert reports[0]["master_addr"] == "127.0.0.1" and 20000 <= reports[0]["master_port"] < 32000
    # ... but the ranks met where rank 0 sent them through MPI: a port the kernel gave it (launch.rendezvous).
    assert reports[0]["rendezvous"].startswith("mpi:127.0.0.1:"), reports[0]


def test_env_without_launcher_is_one_process_and_imports_no_torch() -> None:
    code = "import sys, launch.environment, launch.cli; assert not {'torch', 'jobs', 'distkfac'} & set(sys.modules)"
    assert _run([PYTHON, "-c", code]).returncode == 0
    clean = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "PBS_", "OMPI_", "PMI", "MASTER_"))}
    clean = {k: v for k, v in clean.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = _run([PYTHON, "-m", "launch", "env", "--init"], clean)
    assert result.returncode == 0, result.stderr
    (report,) = _reports(result.stdout)
    assert (report["launcher"], report["world_size"], report["allreduce_sum"]) == ("single", 1, 1)


def test_env_exits_non_zero_with_the_reason_on_inconsistent_variables() -> None:
    result = _run([PYTHON, "-m", "launch", "env"], {**ENV, "RANK": "2", "WORLD_SIZE": "2"})
    assert result.returncode == 2
    assert "rank 2 of 2" in result.stderr and "inconsistent" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["env", "submit", "status", "cancel"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: python -m launch " + command in capsys.readouterr().out


# --- detection from the variables of launchers that cannot run here -----------------------------------------------


def test_mpich_pmi() -> None:
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "n01"}
    assert detect(env) == Environment(3, 4, 1, 2, "n01", 29500, "pmi", None, None)


def _slurm_step(rank: int, node: int, local: int, step: str = "0") -> dict[str, str]:
    """What plain srun (no PMIx) gives task ``rank`` of a 5-task step over gpu[07-09] laid out 2,2,1."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": step,
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
        "SLURM_STEP_NODELIST": "gpu[07-09]",
        "SLURM_JOB_NODELIST": "gpu[07-09],login1",
        "SLURM_NTASKS": "5",
    }


def test_slurm_without_pmix() -> None:
    first, last = detect(_slurm_step(0, 0, 0)), detect(_slurm_step(4, 2, 0))
    assert (last.rank, last.world_size, last.local_rank, last.local_world_size) == (4, 5, 0, 1)
    assert (first.local_world_size, last.launcher, last.scheduler, last.job_id) == (2, "slurm", "slurm", "4242")
    assert first.master_addr == last.master_addr == "gpu07"
    assert first.master_port == last.master_port and 20000 <= last.master_port < 32000
    assert detect(_slurm_step(4, 2, 0, step="1")).master_port != last.master_port, "steps of one job share a port"


def test_slurm_pmix_takes_the_rank_from_pmix() -> None:
    env = {**_slurm_step(3, 1, 1), "PMIX_RANK": "3"}
    environment = detect(env)
    assert (environment.launcher, environment.rank, environment.local_rank, environment.local_world_size) == (
        "pmix",
        3,
        1,
        2,
    )


def test_pbs_nodefile_names_the_master(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cn17\ncn17\ncn18\ncn18\n")
    env = {
        "PBS_JOBID": "77.pbs-server",
        "PBS_NODEFILE": str(nodefile),
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    environment = detect(env)
    assert (environment.master_addr, environment.scheduler, environment.job_id) == ("cn17", "pbs", "77.pbs-server")
    assert (environment.rank, environment.local_rank, environment.launcher) == (2, 0, "openmpi")
    with pytest.raises(LaunchError, match="PBS_NODEFILE"):
        detect({**env, "PBS_NODEFILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node7", "node7"),
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("gpu[12,07-09]", "gpu12"),
        ("login1,gpu[1-4]", "login1"),
        ("rack[2-3]-node[001-016]", "rack2-node001"),
        ("cn[1-2]-ib", "cn1-ib"),
    ],
)
def test_slurm_node_list_first_host(nodelist: str, first: str) -> None:
    assert expand_first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[07-09", "gpu]07[", ",node1"])
def test_slurm_node_list_malformed(nodelist: str) -> None:
    with pytest.raises(LaunchError, match="node list"):
        expand_first_host(nodelist)


def test_batch_script_without_srun_is_one_process() -> None:
    # A batch script's own variables (seen in a real job): SLURM_NTASKS=4 but no SLURM_STEP_*.
    env = {"SLURM_JOB_ID": "31", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}
    environment = detect({**env, "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "vm", "SLURM_TASKS_PER_NODE": "4"})
    assert (environment.launcher, environment.rank, environment.world_size) == ("single", 0, 1)
    assert (environment.scheduler, environment.job_id, environment.master_addr) == ("slurm", "31", "vm")


def test_launcher_without_local_world_size() -> None:
    environment = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0"})
    assert (environment.launcher, environment.local_rank, environment.master_addr) == ("torchrun", 1, "h0")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "inconsistent"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, "inconsistent"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "inconsistent"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "not an integer"),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK is not set"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "rank 0 of 0"),
        ({**_slurm_step(0, 0, 0), "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, "adds up to 6"),
        ({**_slurm_step(0, 0, 0), "SLURM_NODEID": "3"}, "SLURM_NODEID=3"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_inconsistent_values_are_an_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        detect(env)


# --- rendering (submit --dry-run) ---------------------------------------------------------------------------------

JOB_TOML = """
[job]
nodes = 2
tasks_per_node = 4
gpus_per_node = 4
cpus_per_task = 8
walltime = "1-02:00:00"
partition = "gpu"
account = "proj42"
output = "logs/%x-%j.out"
modules = ["cuda/12.1", "openmpi/4.1.5"]
env = { NCCL_DEBUG = "WARN", TRICKY = "it's a $HOME `test` \\\\ \\"x\\"" }
image = "containers/distkfac.sif"
"""
TRICKY = 'it\'s a $HOME `test` \\ "x"'
OVERRIDE = "run.out_dir='runs/a b; rm -rf ~'"


def _dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = main(["submit", "--dry-run", *argv])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


def _files(tmp_path: Path, job: str = JOB_TOML) -> tuple[str, str]:
    (tmp_path / "job.toml").write_text(job)
    (tmp_path / "run.toml").write_text("[optim]\nlr = 0.1\n")
    return str(tmp_path / "job.toml"), str(tmp_path / "run.toml")


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.sh"
    path.write_text(script)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _exports(script: str) -> dict[str, str]:
    """Run the script's export lines in bash and read the values back: proves the quoting."""
    lines = [line for line in script.splitlines() if line.startswith("export ") and "LAUNCH_ARRAY" not in line]
    names = [line.split()[1].split("=")[0] for line in lines]
    code = "\n".join([*lines, *(f'printf "%s\\0" "${name}"' for name in names)])
    values = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.split("\0")
    return dict(zip(names, values, strict=False))


def test_slurm_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job, config = _files(tmp_path)
    script = _dry_run(capsys, "--scheduler", "slurm", "--job", job, "--config", config, "--array", "8",
                      "optim.lr=0.2", OVERRIDE)  # fmt: skip
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash -l"  # a login shell, so that `module` exists
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=run",  # the training config's stem
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--gpus-per-node=4",
        "--time=26:00:00",
        "--partition=gpu",
        "--account=proj42",
        "--output=logs/%x-%j.out",
        "--array=0-7",
    ]
    assert lines.index("module load cuda/12.1") < lines.index("module load openmpi/4.1.5")
    assert _exports(script) == {"NCCL_DEBUG": "WARN", "TRICKY": TRICKY, "OMP_NUM_THREADS": "8"}
    assert 'export LAUNCH_ARRAY_INDEX="${SLURM_ARRAY_TASK_ID:-' in script
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in script  # srun: no Open MPI launcher
    command = shlex.split(lines[-1])
    assert command == [
        "srun", "--mpi=pmix", "--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=8",
        "apptainer", "exec", "--nv", "containers/distkfac.sif",
        "python", "-m", "jobs.train", "--config", config, "optim.lr=0.2", OVERRIDE,
    ]  # fmt: skip
    _bash_syntax_ok(script, tmp_path)


def test_pbs_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job, config = _files(tmp_path)
    script = _dry_run(capsys, "--scheduler", "pbs", "--job", job, "--config", config, "--queue", "long",
                      "--error", "logs/err.txt", "--array", "0-3,7", "--name", "kfac")  # fmt: skip
    lines = script.splitlines()
    directives = [line.removeprefix("#PBS ") for line in lines if line.startswith("#PBS ")]
    assert directives == [
        "-N kfac",
        "-l nodes=2:ppn=32:gpus=4",  # ppn counts cores: 4 tasks x 8 cpus
        "-l walltime=26:00:00",
        "-q long",
        "-A proj42",
        "-o logs/%x-%j.out",
        "-e logs/err.txt",
        "-t 0-3,7",
    ]
    assert 'cd "${PBS_O_WORKDIR:-$PWD}"' in lines
    assert "PBS_NODEFILE=$(generate_pbs_nodefile)" in script
    assert 'if [ "$(id -u)" -eq 0 ]; then' in script and "OMPI_ALLOW_RUN_AS_ROOT=1" in script
    assert shlex.split(lines[-1]) == [
        "mpirun", "-np", "8", "--map-by", "ppr:4:node:PE=8", "--hostfile", "$PBS_NODEFILE",
        "-x", "OMP_NUM_THREADS", "-x", "NCCL_DEBUG", "-x", "TRICKY",
        "apptainer", "exec", "--nv", "containers/distkfac.sif", "python", "-m", "jobs.train", "--config", config,
    ]  # fmt: skip
    assert '--hostfile "$PBS_NODEFILE"' in lines[-1]  # expanded by the job's shell, not quoted away
    _bash_syntax_ok(script, tmp_path)


def test_pbs_pro_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job, config = _files(tmp_path)
    script = _dry_run(capsys, "--scheduler", "pbs", "--pbs-flavor", "pro", "--job", job, "--config", config,
                      "--array", "4", "--gpus-per-node", "0", "--no-nv")  # fmt: skip
    assert "#PBS -l select=2:ncpus=32:mpiprocs=4\n" in script
    assert "#PBS -J 0-3\n" in script and "#PBS -t" not in script
    assert "apptainer exec containers/distkfac.sif python" in script
    assert main(["submit", "--dry-run", "--scheduler", "pbs", "--pbs-flavor", "pro", "--config", config,
                 "--array", "1"]) == 2  # fmt: skip
    assert "at least two indices" in capsys.readouterr().err


def test_job_table_of_the_training_config_and_flags_over_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "mnist-kfac.toml"
    config.write_text('[job]\nnodes = 3\nntasks = 6\nmodules = ["a"]\nenv = { A = "1" }\n\n[optim]\nlr = 0.1\n')
    job = tmp_path / "cluster.toml"
    job.write_text('[job]\nwalltime = 90\nmodules = ["b"]\nenv = { A = "2", B = "x" }\n')
    script = _dry_run(capsys, "--scheduler", "slurm", "--config", str(config), "--job", str(job),
                      "--nodes", "2", "--tasks-per-node", "3", "--module", "c", "--env", "B=y")  # fmt: skip
    assert "#SBATCH --job-name=mnist-kfac\n" in script  # named after the config
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=3\n" in script
    assert "#SBATCH --time=1:30:00\n" in script
    assert [line for line in script.splitlines() if line.startswith("module")] == [
        "module load a",
        "module load b",
        "module load c",
    ]
    assert _exports(script) == {"A": "2", "B": "y", "OMP_NUM_THREADS": "1"}


def test_worker_array_with_its_own_command(capsys: pytest.CaptureFixture[str]) -> None:
    script = _dry_run(capsys, "--scheduler", "slurm", "--array", "0-15%4", "--launcher", "none",
                      "--command", "python -m hpo_worker work --index $LAUNCH_ARRAY_INDEX")  # fmt: skip
    assert "#SBATCH --array=0-15%4\n" in script
    assert script.splitlines()[-1] == "python -m hpo_worker work --index $LAUNCH_ARRAY_INDEX"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--walltime", "1h"], "walltime '1h' is not valid: use HH:MM:SS"),
        (["--walltime", "01:75:00"], "walltime '01:75:00' is not valid"),
        (["--walltime", "0"], "walltime must be positive"),
        (["--nodes", "0"], "nodes must be at least 1"),
        (["--tasks-per-node", "two"], "tasks_per_node must be a whole number"),
        (["--gpus-per-node", "-1"], "gpus_per_node must be at least 0"),
        (["--nodes", "2", "--tasks-per-node", "3", "--ntasks", "8"], "ntasks=8 but nodes=2 x tasks_per_node=3"),
        (["--nodes", "4", "--ntasks", "6"], "does not split evenly"),
        (["--array", "0-"], "array '0-' is not valid"),
        (["--name", "my job"], "no spaces or quotes"),
        (["--env", "1X=2"], "not a shell variable name"),
        (["--launcher", "ssh"], "launcher must be one of srun, mpirun, none"),
        (["--command", "true", "optim.lr=0.1"], "put them in the command"),
        ([], "nothing to run"),
    ],
)
def test_invalid_job_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--dry-run", "--scheduler", "slurm", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_job_key_and_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job, config = _files(tmp_path, "[job]\nnodse = 2\n")
    assert main(["submit", "--dry-run", "--job", job, "--config", config]) == 2
    assert "unknown job key 'nodse'" in capsys.readouterr().err
    assert main(["submit", "--dry-run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err


# --- submission without a scheduler -------------------------------------------------------------------------------


@pytest.fixture
def no_scheduler_env(tmp_path: Path) -> dict[str, str]:
    """PATH with only a python: no sbatch, no qsub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(PYTHON)
    return {**ENV, "PATH": str(bin_dir)}


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("slurm", "sbatch not found on PATH: run on the cluster's login node or load the Slurm module; use --dry-run"),
        ("pbs", "qsub not found on PATH: run on the cluster's login node or load the PBS module; use --dry-run"),
        (None, "neither sbatch (Slurm) nor qsub (PBS) found on PATH"),
    ],
)
def test_submit_without_the_scheduler_command(
    no_scheduler_env: dict[str, str], scheduler: str | None, message: str
) -> None:
    argv = ["python", "-m", "launch", "submit", "--command", "true", *(["--scheduler", scheduler] if scheduler else [])]
    result = _run(argv, no_scheduler_env)
    assert result.returncode == 2
    assert message in result.stderr
    dry = _run([*argv, "--dry-run"], no_scheduler_env)
    assert dry.returncode == 0 and dry.stdout.startswith("#!/bin/bash"), dry.stderr


def test_waiting_on_a_pbs_server_reads_qstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Slurm (no scontrol), --wait polls `qstat -f [-x]` until the job is done and returns exit_status."""
    calls = tmp_path / "calls"
    qstat = tmp_path / "qstat"
    qstat.write_text(
        f'#!/bin/bash\nPATH=/usr/bin:/bin\necho "$@" >> {calls}\n'
        f"if [ $(wc -l < {calls}) -lt 3 ]; then state=R; else state=F; fi\n"
        'printf "Job Id: 12.server\\n    job_state = %s\\n" "$state"\n'
        '[ "$state" = F ] && printf "    Exit_status = 7\\n"\nexit 0\n'
    )
    qstat.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert wait_for_job("12.server", "pro", poll=0.01) == 7
    assert calls.read_text().splitlines() == ["-f -x 12.server"] * 3


def test_a_job_slurm_forgot_before_sbatch_wait_read_it_is_not_a_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sbatch --wait exits 0 when the controller purged the finished job between two polls (MinJobAge). A stand-in
    sbatch prints what Slurm 22.05 prints then, since the race cannot be made to happen on demand (it happened once
    under a loaded `make test`, with MinJobAge=2): launch says the status is unknown instead of 0."""
    from launch.submit import _sbatch

    sbatch = tmp_path / "sbatch"
    sbatch.write_text(
        "#!/bin/bash\necho 109\necho 'sbatch: error: Job 109 no longer found and exit code not found' >&2\nexit 0\n"
    )
    sbatch.chmod(0o755)
    with pytest.raises(LaunchError, match=r"Slurm forgot job 109 before sbatch --wait read its exit status"):
        _sbatch([str(sbatch), "--parsable", "--wait", "job.sh"], sys.stdout)
    captured = capsys.readouterr()
    assert captured.out.strip() == "109" and "no longer found" in captured.err


# --- a real Slurm: sbatch and qsub --------------------------------------------------------------------------------


def _submit(tmp_path: Path, *argv: str, name: str = "job") -> tuple[subprocess.CompletedProcess[str], str, str]:
    """`python -m launch submit ... --wait` into the real cluster; (result, job output, job errors)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    command = [PYTHON, "-m", "launch", "submit", "--walltime", "00:05:00", "--chdir", str(ROOT),
               "--output", str(out), "--error", str(err), "--wait", *argv]  # fmt: skip
    result = _run(command)
    read = lambda path: path.read_text() if path.exists() else ""  # noqa: E731
    return result, read(out), read(err)


ENV_INIT = f"{PYTHON} -m launch env --init"


@pytest.mark.parametrize("tasks", [2, 4])
@pytest.mark.usefixtures("slurm_cluster")
def test_sbatch_srun_pmix(tmp_path: Path, tasks: int) -> None:
    result, out, err = _submit(tmp_path, "--scheduler", "slurm", "--tasks-per-node", str(tasks),
                               "--command", ENV_INIT)  # fmt: skip
    where = f"{result.stderr}\n--- job output:\n{out}\n--- job errors:\n{err[-3000:]}"
    assert result.returncode == 0, where
    job_id = result.stdout.strip()
    reports = _reports(out)
    _check_ranks(reports, tasks, "pmix", where)
    assert {(r["scheduler"], r["job_id"], r["master_addr"]) for r in reports} == {
        ("slurm", job_id, socket.gethostname().split(".")[0])
    }


@pytest.mark.parametrize("tasks", [2, 4])
@pytest.mark.usefixtures("slurm_cluster")
def test_qsub_mpirun(tmp_path: Path, tasks: int) -> None:
    result, out, err = _submit(tmp_path, "--scheduler", "pbs", "--tasks-per-node", str(tasks),
                               "--command", ENV_INIT)  # fmt: skip
    where = f"{result.stderr}\n--- job output:\n{out}\n--- job errors:\n{err[-3000:]}"
    assert result.returncode == 0, where
    reports = _reports(out)
    _check_ranks(reports, tasks, "openmpi", where)
    # Slurm's qsub runs the job under Slurm; generate_pbs_nodefile gave the PBS_NODEFILE.
    assert {r["job_id"] for r in reports} == {result.stdout.strip()}


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
@pytest.mark.usefixtures("slurm_cluster")
def test_wait_passes_the_exit_status_through(tmp_path: Path, scheduler: str) -> None:
    command = f"{PYTHON} -c 'import sys; sys.exit(3)'"
    result, _, err = _submit(tmp_path, "--scheduler", scheduler, "--tasks-per-node", "2", "--command", command)
    assert result.returncode == 3, f"{result.stderr}\n{err}"


@pytest.mark.usefixtures("slurm_cluster")
def test_array_of_workers(tmp_path: Path) -> None:
    out = tmp_path / "logs" / "worker-%a.out"  # submit makes logs/: Slurm would not, and the job would fail
    command = [PYTHON, "-m", "launch", "submit", "--scheduler", "slurm", "--array", "3", "--launcher", "none",
               "--walltime", "5", "--output", str(out), "--wait",
               "--command", "echo worker $LAUNCH_ARRAY_INDEX of ${SLURM_ARRAY_TASK_COUNT}"]  # fmt: skip
    result = _run(command)
    assert result.returncode == 0, result.stderr
    for index in range(3):
        assert (tmp_path / "logs" / f"worker-{index}.out").read_text() == f"worker {index} of 3\n"


@pytest.mark.usefixtures("slurm_cluster")
def test_status_and_cancel(tmp_path: Path) -> None:
    submitted = _run([PYTHON, "-m", "launch", "submit", "--scheduler", "slurm", "--launcher", "none",
                      "--output", str(tmp_path / "sleep.out"), "--command", "sleep 300"])  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"\d+", job_id)
    status = _run([PYTHON, "-m", "launch", "status", job_id])
    assert status.returncode == 0 and f"JobId={job_id}" in status.stdout
    assert _run([PYTHON, "-m", "launch", "cancel", job_id]).returncode == 0
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        shown = _run(["scontrol", "show", "job", job_id])
        state = (re.findall(r"JobState=(\S+)", shown.stdout) or ["gone"])[0]
        if state in ("CANCELLED", "gone"):
            break
        time.sleep(0.2)
    assert state in ("CANCELLED", "gone")


def test_podman_image_line_passes_identity_variables_and_mounts_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, config = _files(tmp_path)
    script = _dry_run(capsys, "--scheduler", "pbs", "--config", config, "--ntasks", "2", "--gpus-per-node", "1",
                      "--container", "podman", "--image", "localhost/distkfac:gpu", "--env", "NCCL_DEBUG=INFO",
                      "--container-arg=--userns=keep-id")  # fmt: skip
    _bash_syntax_ok(script, tmp_path)
    line = script.strip().splitlines()[-1]
    # Run the launch line with mpirun and podman replaced by functions that print their words, in another directory:
    # $PWD is expanded by the job's shell, everything else arrives as one word each.
    (tmp_path / "job dir").mkdir()
    stub = 'mpirun() { while [ "$1" != podman ]; do shift; done; printf "%s\\n" "$@"; }\n' + line.replace(
        '"$PBS_NODEFILE"', "nodes"
    )
    result = subprocess.run(["bash", "-c", stub], capture_output=True, text=True, cwd=tmp_path / "job dir")
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()
    here = str(tmp_path / "job dir")
    assert words[:3] == ["podman", "run", "--rm"] and "--network=host" in words and "--ipc=host" in words
    for name in ("SLURM_*", "PMIX_*", "OMPI_*", "PBS_*", "MASTER_*", "OMP_NUM_THREADS", "NCCL_DEBUG"):
        assert f"--env={name}" in words, name
    assert "--device=nvidia.com/gpu=all" in words  # GPUs asked for: podman's CDI device
    assert "--env=OMPI_MCA_btl=self,tcp" in words  # Open MPI's shared memory does not cross containers
    assert f"--volume={here}:{here}" in words and f"--workdir={here}" in words
    image = words.index("localhost/distkfac:gpu")
    assert words[image - 1] == "--userns=keep-id" and words[image + 1 :] == [
        "python",
        "-m",
        "jobs.train",
        "--config",
        config,
    ]
    no_gpu = _dry_run(capsys, "--scheduler", "slurm", "--config", config, "--container", "podman", "--image", "img")
    assert "--device" not in no_gpu and "podman run --rm" in no_gpu


def test_an_unknown_container_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, config = _files(tmp_path)
    assert main(["submit", "--dry-run", "--config", config, "--container", "docker", "--image", "img"]) == 2
    assert "apptainer, singularity, podman" in capsys.readouterr().err


def test_sbatch_messages_are_passed_on_while_sbatch_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --wait, sbatch runs as long as the job, so its stderr is relayed as it comes, not when it exits. A
    stand-in sbatch prints a message and then waits until the test has seen it (a real sbatch prints such messages
    only on Slurm's faults, which cannot be made to happen on demand)."""
    from launch.submit import _sbatch

    seen = tmp_path / "seen"
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(
        "#!/bin/bash\necho 41\necho 'sbatch: warning: slow controller' >&2\n"
        f"for i in $(seq 200); do [ -e {seen} ] && exit 3; sleep 0.05; done\nexit 9\n"
    )
    sbatch.chmod(0o755)
    result: list[Any] = []
    waiting = threading.Thread(target=lambda: result.append(_sbatch([str(sbatch), "--wait", "job.sh"], sys.stdout)))
    waiting.start()
    err = ""
    for _ in range(100):
        err += capsys.readouterr().err
        if "slow controller" in err:
            break
        time.sleep(0.05)
    seen.touch()
    waiting.join(timeout=20)
    assert "slow controller" in err, "sbatch's message was held back until it exited"
    assert result and result[0].job_id == "41" and result[0].exit_status == 3
