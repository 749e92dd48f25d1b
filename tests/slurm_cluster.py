"""A real single-node Slurm (with Slurm's PBS wrappers) for tests: munge, slurmctld and slurmd on this machine.

Follows /work/shared/notes/hpc-stack.md: munge runs as its own user, ``/etc/slurm/slurm.conf`` describes this host
with ``CPUs=8`` and ``SlurmdParameters=config_overrides`` (so 4-rank jobs fit on 2 real cores), and
``/etc/slurm/plugstack.conf.d/pbs.conf`` loads ``spank_pbs.so`` so that jobs submitted with ``qsub`` see PBS_*
variables. Needs root and the apt packages ``slurm-wlm munge slurm-wlm-torque`` (scripts/setup.sh installs them);
without them the fixture fails with a message saying so.

Several test sessions may share the cluster: each registers its pid under ``STATE_DIR/users``; the last one to leave
stops the daemons this module started (``scontrol shutdown``, then munged if it started munged). A cluster left by a
killed session (our config, daemons alive) is reused, and stopped by the next session that leaves. A
``slurm.conf`` written by anyone else is never touched: the fixture fails instead.

By hand: ``python -m tests.slurm_cluster start`` / ``stop``.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_CONF = Path("/etc/slurm/slurm.conf")
PBS_PLUGSTACK = Path("/etc/slurm/plugstack.conf.d/pbs.conf")
STATE_DIR = Path("/run/distkfac-slurm-test")
MUNGE_PIDFILE = Path("/run/munge/munged.pid")
SLURMCTLD_PIDFILE = Path("/run/slurmctld.pid")
SLURMD_PIDFILE = Path("/run/slurmd.pid")
MARKER = "# Written by distkfac tests/slurm_cluster.py: a single-node test cluster."
APT_HINT = (
    "install them with `apt-get install -y --no-install-recommends slurm-wlm munge slurm-wlm-torque` "
    "(scripts/setup.sh does this)"
)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class SlurmCluster:
    host: str
    partition: str
    cpus: int


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _spank_pbs() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/slurm-wlm/spank_pbs.so") + glob.glob("/usr/lib/slurm*/spank_pbs.so"))
    return found[0] if found else None


def check_installed() -> None:
    """Fail (not skip) with the fix when a piece of the stack is missing or we are not root."""
    commands = {
        "munged": "munge",
        "munge": "munge",
        "slurmctld": "slurm-wlm",
        "slurmd": "slurm-wlm",
        "sbatch": "slurm-wlm",
        "scontrol": "slurm-wlm",
        "sinfo": "slurm-wlm",
        "qsub": "slurm-wlm-torque",
        "qstat": "slurm-wlm-torque",
        "generate_pbs_nodefile": "slurm-wlm-torque",
    }
    missing = sorted({f"{package} ({name})" for name, package in commands.items() if _which(name) is None})
    if _spank_pbs() is None:
        missing.append("slurm-wlm (spank_pbs.so)")
    if missing:
        pytest.fail(f"the Slurm test cluster needs packages that are missing: {', '.join(missing)}; {APT_HINT}")
    if os.geteuid() != 0:
        pytest.fail("the Slurm test cluster starts slurmctld, slurmd and munged: run the tests as root")


def slurm_conf(host: str) -> str:
    return f"""{MARKER}
ClusterName=distkfac-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile={SLURMCTLD_PIDFILE}
SlurmdPidFile={SLURMD_PIDFILE}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
# sbatch --wait polls every 2 s instead of backing off to 32 s (Slurm 22.05 multiplies its 2 s by 4 only while that
# is below MinJobAge/2); finished jobs leave scontrol after 4 s, two polls. With 2 s, a poll that came late on a
# loaded machine found the job gone, and sbatch exited 0 for a job that had failed (2026-12-03).
MinJobAge=4
KillWait=5
# 8 CPUs whatever the machine has, so that 4-rank jobs fit on 2 real cores.
SlurmdParameters=config_overrides
NodeName={host} CPUs=8 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(*command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, env={**os.environ, "PATH": SBIN_PATH}
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for init to reap it (a killed daemon looks alive to kill(pid, 0))."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` when that process is alive."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _stop_pid(pid: int | None, grace: float) -> None:
    """Give ``pid`` ``grace`` seconds to exit by itself, then SIGTERM it (SIGKILL if that does not do)."""
    if pid is None or _wait_gone(pid, grace):
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 10):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)


def _munge_works() -> bool:
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run(["unmunge"], input=token, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _start_munge() -> int:
    """Start munged as the munge user (a root-started munged leaves a root-owned log that breaks later starts)."""
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run("mungekey", "--create", "--keyfile", str(key))
    _run("install", "-d", "-o", "munge", "-g", "munge", "-m0755", "/run/munge")
    for path in ("/etc/munge", "/var/log/munge", "/var/lib/munge"):
        _run("chown", "-R", "munge:munge", path)
    _run("runuser", "-u", "munge", "--", _which("munged") or "/usr/sbin/munged")
    deadline = time.monotonic() + START_TIMEOUT
    while not _munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged did not start: see /var/log/munge/munged.log")
        time.sleep(0.1)
    pid = _pid(MUNGE_PIDFILE)
    if pid is None:
        raise RuntimeError(f"munged runs but {MUNGE_PIDFILE} names no live process")
    return pid


def _node_state(host: str) -> str | None:
    result = _run("sinfo", "--noheader", "--Node", "--nodes", host, "--format=%T", check=False, timeout=10)
    return result.stdout.strip().lower() or None if result.returncode == 0 else None


def _log_tails() -> str:
    tails = []
    for log in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log"):
        with suppress(OSError):
            tails.append(f"--- {log}\n" + "\n".join(Path(log).read_text().splitlines()[-15:]))
    return "\n".join(tails)


def _wait_idle(host: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    state = None
    while time.monotonic() < deadline:
        state = _node_state(host)
        if state is not None and state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing"):
            return
        if state is not None and ("down" in state or "drain" in state):
            _run("scontrol", "update", f"nodename={host}", "state=resume", check=False)
        time.sleep(0.2)
    raise RuntimeError(f"node {host} did not become idle (state {state!r}):\n{_log_tails()}")


def _stop_slurm() -> None:
    ctld, slurmd = _pid(SLURMCTLD_PIDFILE), _pid(SLURMD_PIDFILE)
    if ctld is not None:
        _run("scontrol", "shutdown", check=False, timeout=15)
    _stop_pid(ctld, grace=15)
    # `scontrol shutdown` stops slurmd too; a slurmd whose slurmctld had died is signalled at once.
    _stop_pid(slurmd, grace=15 if ctld is not None else 0)


def _start_slurm(host: str) -> None:
    for directory in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    spank = _spank_pbs()
    PBS_PLUGSTACK.parent.mkdir(parents=True, exist_ok=True)
    PBS_PLUGSTACK.write_text(f"required {spank}\n")
    SLURM_CONF.write_text(slurm_conf(host))
    _run(_which("slurmctld") or "slurmctld", "-c")  # -c: forget jobs and node states of earlier runs
    _run(_which("slurmd") or "slurmd")
    _wait_idle(host)


def _healthy(host: str) -> bool:
    if _pid(SLURMCTLD_PIDFILE) is None or _pid(SLURMD_PIDFILE) is None:
        return False
    if _run("scontrol", "ping", check=False, timeout=10).returncode != 0:
        return False
    state = _node_state(host)
    return state is not None and state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")


@contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _users() -> list[int]:
    alive = []
    for entry in (STATE_DIR / "users").glob("*"):
        if entry.name.isdigit() and _alive(int(entry.name)):
            alive.append(int(entry.name))
        else:
            entry.unlink(missing_ok=True)
    return alive


def start() -> SlurmCluster:
    """Bring the cluster up (or reuse the one running with our config) and register this process as a user."""
    check_installed()
    host = socket.gethostname().split(".")[0]
    owner_file = STATE_DIR / "owner.json"
    with _locked():
        if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(MARKER):
            raise RuntimeError(
                f"{SLURM_CONF} was not written by tests/slurm_cluster.py: refusing to replace a real Slurm "
                "configuration or stop its daemons; move it away to run these tests"
            )
        owner = json.loads(owner_file.read_text()) if owner_file.exists() else {"munge": False}
        started_munge = False
        try:
            if not _munge_works():
                _start_munge()
                owner["munge"] = started_munge = True
            conf_matches = SLURM_CONF.exists() and SLURM_CONF.read_text() == slurm_conf(host)
            if not (conf_matches and _healthy(host)):
                _stop_slurm()
                _start_slurm(host)
        except BaseException:
            # Leave nothing half started behind: the fixture fails, and no teardown will run.
            _stop_slurm()
            if started_munge:
                _stop_pid(_pid(MUNGE_PIDFILE), grace=0)
            raise
        owner_file.write_text(json.dumps(owner))
        (STATE_DIR / "users").mkdir(exist_ok=True)
        (STATE_DIR / "users" / str(os.getpid())).touch()
    return SlurmCluster(host=host, partition="debug", cpus=8)


def stop(force: bool = False) -> None:
    """Unregister this process; the last user stops the daemons (and munged, if this module started it)."""
    owner_file = STATE_DIR / "owner.json"
    with _locked():
        (STATE_DIR / "users" / str(os.getpid())).unlink(missing_ok=True)
        if (STATE_DIR / "users").exists() and _users() and not force:
            return
        if not owner_file.exists():
            return
        owner = json.loads(owner_file.read_text())
        _stop_slurm()
        if owner.get("munge"):
            _stop_pid(_pid(MUNGE_PIDFILE), grace=0)
        owner_file.unlink()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node Slurm for the whole session; stopped at the end unless another session still uses it."""
    try:
        cluster = start()
    except RuntimeError as error:
        pytest.fail(f"could not start the Slurm test cluster: {error}")
    try:
        yield cluster
    finally:
        stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["start"]:
        print(start())
        # A manual start registers no live user: the cluster runs until `stop`.
        (STATE_DIR / "users" / str(os.getpid())).unlink(missing_ok=True)
    elif sys.argv[1:] == ["stop"]:
        stop(force=True)
    else:
        sys.exit("usage: python -m tests.slurm_cluster start|stop")
