"""The container files of docker/ (docs/containers.md): linted, checked, and the CPU image built and run for real.

The first tests need no image: hadolint on every Dockerfile, the compose file through ``podman-compose config``, the
secrets script, the Apptainer definition. The tests marked ``images`` (``make test-images``, part of ``make test``)
build the images with podman from a debootstrap base (``scripts/build_images.sh``; cached in build/images/ and in
podman's layer cache, so a rebuild after a source change takes seconds) and run them: ``launch env``, a 2-rank
torchrun, Horovod under mpirun, a driver and worker round, and a 2-task Slurm job whose tasks each run in a
container. The GPU Dockerfile is built up to its stage before the CUDA wheels; the rest of it needs a GPU machine's
time and downloads, and is not built here.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from pymongo.uri_parser import parse_uri

from tests.processes import ENV, PYTHON, ROOT
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture: a real single-node Slurm)
from tests.synthetic_configs import synthetic_mlp_toml

VENV_BIN = Path(PYTHON).parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
COMPOSE = ROOT / "docker" / "compose.yaml"
CPU_IMAGE = "localhost/distkfac:cpu"
GPU_BUILD_BASE = "localhost/distkfac:gpu-build-base"
# podman as root on these machines: runc's default limits are refused (../shared/notes/hpc-stack.md).
PODMAN_RUN = ["podman", "run", "--rm", "--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"]
IN_IMAGE_CONFIG = synthetic_mlp_toml(
    batch_size=64, train_size=512, test_size=128, lr="0.05", run="steps = 8\neval_every = 4\nprogress = false"
)


def _run(
    command: list[str], timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=cwd)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"


# --- the files, no image needed -------------------------------------------------------------------------------------


def test_hadolint_passes_on_every_dockerfile_and_catches_a_bad_one(tmp_path: Path) -> None:
    assert [path.name for path in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu"]
    for path in DOCKERFILES:
        result = _run([str(VENV_BIN / "hadolint"), str(path)])
        assert result.returncode == 0 and not result.stdout.strip(), _tail(result)
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = _run([str(VENV_BIN / "hadolint"), str(bad)])
    assert result.returncode != 0 and "DL3008" in result.stdout  # unpinned apt packages are what it must catch


def _stages(path: Path) -> dict[str, list[str]]:
    """A Dockerfile's instructions (continuation lines joined, comments dropped), by stage name."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: dict[str, list[str]] = {}
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith("FROM "):
            stages[line.split()[-1]] = []
        elif line and not line.startswith("#") and stages:
            stages[list(stages)[-1]].append(line)
    return stages


def test_both_images_share_their_base_stage_and_their_compiler_layer() -> None:
    # One text in both files: a pin is changed in both at once, and podman builds the GPU image's first layers from
    # the CPU image's cache (the tests' gpu-base build takes seconds because of it).
    gpu, cpu = _stages(ROOT / "docker" / "Dockerfile"), _stages(ROOT / "docker" / "Dockerfile.cpu")
    assert gpu["base"] == cpu["base"] and gpu["base"]
    assert gpu["build-base"][:3] == cpu["build"][:3] and gpu["build-base"][0].startswith("RUN apt-get update")
    assert gpu["runtime"][:2] == cpu["runtime"][:2] == ["COPY --from=build /opt/venv /opt/venv",
                                                        "COPY --from=build /opt/distkfac /opt/distkfac"]  # fmt: skip


def _compose_config(secrets: Path) -> dict[str, object]:
    result = _run(
        [str(VENV_BIN / "podman-compose"), "-f", str(COMPOSE), "config"], env={**ENV, "HPO_SECRETS_DIR": str(secrets)}
    )
    assert result.returncode == 0, _tail(result)
    config: dict[str, object] = yaml.safe_load(result.stdout)
    return config


def test_compose_file_is_valid_and_takes_its_credentials_from_secrets(tmp_path: Path) -> None:
    # Only the file is checked here: its MongoDB service cannot start on these machines, which have no registry to
    # pull docker.io/library/mongo from. test_driver_and_worker_round_in_the_cpu_image runs the same hpo_worker
    # commands in the image against a server, and tests/test_credentials.py checks --mongo-file with authentication.
    secrets = tmp_path / "secrets"
    result = _run(["bash", str(ROOT / "docker" / "make_secrets.sh"), str(secrets)])
    assert result.returncode == 0, _tail(result)
    config = _compose_config(secrets)
    services = config["services"]
    assert isinstance(services, dict) and set(services) == {"mongo", "driver", "worker"}
    mongo, driver, worker = services["mongo"], services["driver"], services["worker"]
    assert mongo["environment"] == {
        "MONGO_INITDB_ROOT_USERNAME_FILE": "/run/secrets/mongo_root_user",
        "MONGO_INITDB_ROOT_PASSWORD_FILE": "/run/secrets/mongo_root_password",
    }
    for service in (driver, worker):
        assert "--mongo-file=/run/secrets/hpo_mongo_url" in service["command"]
        assert service["secrets"] == ["hpo_mongo_url"]
        assert "runs:/work/runs" in service["volumes"]
        assert service["depends_on"] == {"mongo": {"condition": "service_healthy"}}
    # --scale needs a service without a fixed name or published port
    assert "container_name" not in worker and "ports" not in worker
    assert config["secrets"] == {name: {"file": str(secrets / name)} for name in
                                 ("mongo_root_user", "mongo_root_password", "hpo_mongo_url")}  # fmt: skip
    password = (secrets / "mongo_root_password").read_text()
    text = COMPOSE.read_text()
    assert password not in text and not re.search(r"mongodb://[^\s/]*:[^\s/]*@", text), "no credential in the file"


def test_make_secrets_writes_private_files_with_a_matching_url_and_keeps_them(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    script = str(ROOT / "docker" / "make_secrets.sh")
    assert _run(["bash", script, str(secrets)]).returncode == 0
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    url = (secrets / "hpo_mongo_url").read_text().strip()
    parsed = parse_uri(url)
    assert parsed["username"] == (secrets / "mongo_root_user").read_text()
    assert parsed["password"] == (secrets / "mongo_root_password").read_text()
    assert len(parsed["password"]) == 48 and parsed["nodelist"] == [("mongo", 27017)]
    assert dict(parsed["options"]) == {"authSource": "admin"}
    assert _run(["bash", script, str(secrets)]).returncode == 0
    assert (secrets / "hpo_mongo_url").read_text().strip() == url, "a second run must not replace the password"


def _def_section(name: str) -> list[str]:
    text = (ROOT / "docker" / "distkfac.def").read_text()
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", text, flags=re.M | re.S)
    assert match, f"docker/distkfac.def has no %{name} section"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_apptainer_definition_builds_from_the_oci_image() -> None:
    text = (ROOT / "docker" / "distkfac.def").read_text()
    assert re.search(r"^Bootstrap: docker-archive$", text, flags=re.M)
    assert re.search(r"^From: \{\{ ARCHIVE \}\}$", text, flags=re.M)
    assert _def_section("arguments") == ["ARCHIVE=distkfac-gpu.tar"]
    assert _def_section("test"), "the %test section is what the CPU image test runs"


# --- the images, built with podman ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_image() -> str:
    """The CPU image of the current tree (podman's layer cache makes a rebuild of unchanged parts take seconds)."""
    assert shutil.which("podman") and shutil.which("debootstrap"), "install podman and debootstrap (scripts/setup.sh)"
    result = _run(["bash", str(ROOT / "scripts" / "build_images.sh"), "cpu"], timeout=2400, cwd=ROOT)
    assert result.returncode == 0, _tail(result)
    return CPU_IMAGE


def _in_image(
    image: str, *command: str, volume: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    mount = [f"--volume={volume}:/work", "--workdir=/work"] if volume else []
    return _run([*PODMAN_RUN, "--network=host", *mount, image, *command], timeout=timeout)


@pytest.mark.images
@pytest.mark.timeout(2700)
def test_cpu_image_runs_launch_env_and_carries_no_compiler(cpu_image: str) -> None:
    result = _in_image(cpu_image, "python", "-m", "launch", "env")
    assert result.returncode == 0, _tail(result)
    report = json.loads(result.stdout)
    assert (report["rank"], report["world_size"], report["launcher"]) == (0, 1, "single")
    versions = _in_image(
        cpu_image, "python", "-c", "import torch, horovod, distkfac; print(torch.__version__, horovod.__version__)"
    )
    assert versions.stdout.split() == ["2.13.0+cpu", "0.28.1"], _tail(versions)
    # Multi-stage: the compilers and headers of the build stage are not in the image that ships.
    # (openmpi-bin's mpicc is only a wrapper: without a compiler and mpi.h it builds nothing.)
    look = "command -v cc gcc c++ g++ cmake; ls /usr/include/python3.11 /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h"
    absent = _in_image(cpu_image, "bash", "-c", look)
    assert absent.returncode != 0 and not absent.stdout.strip(), _tail(absent)


@pytest.mark.images
def test_apptainer_test_section_passes_in_the_cpu_image(cpu_image: str) -> None:
    # The definition's %test is what `apptainer build` runs at its end; Apptainer is not installable here, so its
    # commands run in the OCI image the definition converts.
    for line in _def_section("test"):
        result = _in_image(cpu_image, "bash", "-c", line)
        assert result.returncode == 0, f"{line}\n{_tail(result)}"


@pytest.mark.images
def test_two_rank_torchrun_training_in_the_cpu_image(cpu_image: str, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(IN_IMAGE_CONFIG)
    result = _in_image(cpu_image, "torchrun", "--standalone", "--nproc-per-node=2", "-m", "jobs.train", "--config",
                       "config.toml", "run.out_dir=/work/run", volume=tmp_path)  # fmt: skip
    assert result.returncode == 0, _tail(result)
    records = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert {(r["rank"], r["world_size"], r["launcher"]) for r in records} == {(0, 2, "torchrun"), (1, 2, "torchrun")}
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(rec["step"] for rec in lines if rec["kind"] == "step") == 8
    assert lines[-1]["kind"] == "eval"


@pytest.mark.images
def test_horovod_allreduce_under_mpirun_in_the_cpu_image(cpu_image: str) -> None:
    # Rank 0 prints every rank's view: two ranks printing at once can interleave within a line (seen once in 14).
    script = (
        "import torch, horovod.torch as hvd; hvd.init(); "
        "total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum); "
        "views = hvd.allgather_object((hvd.rank(), hvd.size(), int(total.item()))); "
        "hvd.rank() == 0 and print(sorted(views), hvd.mpi_built(), hvd.gloo_built())"
    )
    result = _in_image(
        cpu_image, "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "python", "-c", script
    )
    assert result.returncode == 0, _tail(result)
    assert result.stdout.strip().splitlines() == ["[(0, 2, 3), (1, 2, 3)] True True"], _tail(result)


@pytest.mark.images
def test_driver_and_worker_round_in_the_cpu_image(cpu_image: str, tmp_path: Path) -> None:
    # The same commands as docker/compose.yaml's services, against the embedded server of --data-dir (no MongoDB
    # image here): the driver starts it, the worker finds it through the data dir.
    (tmp_path / "base.toml").write_text(IN_IMAGE_CONFIG)
    round_ = (
        "python -m hpo_worker driver --data-dir hpo --exp image --space sgd --config base.toml --max-evals 3 "
        "--queue-size 2 & driver=$!; "
        "until [ -s hpo/mongo-url ]; do sleep 0.2; done; "
        "python -m hpo_worker worker --data-dir hpo --workdir trials --idle-timeout 20 --max-trials 3; "
        "wait $driver"
    )
    result = _in_image(cpu_image, "bash", "-c", round_, volume=tmp_path)
    assert result.returncode == 0, _tail(result)
    assert "3/3 finished" in result.stderr, _tail(result)
    assert len(list((tmp_path / "trials").rglob("metrics.jsonl"))) == 3, _tail(result)


@pytest.mark.images
@pytest.mark.usefixtures("slurm_cluster")
def test_submit_with_a_podman_image_runs_each_slurm_task_in_a_container(cpu_image: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(IN_IMAGE_CONFIG)
    log = tmp_path / "job.log"
    submit = [PYTHON, "-m", "launch", "submit", "--scheduler", "slurm", "--tasks-per-node", "2", "--walltime", "10",
              "--container", "podman", "--image", cpu_image, "--container-arg=--ulimit=nofile=1024:1024",
              "--container-arg=--ulimit=nproc=1024:1024", "--chdir", str(tmp_path), "--output", str(log), "--error",
              str(log), "--config", "config.toml", f"run.out_dir={tmp_path / 'run'}", "--wait"]  # fmt: skip
    rendered = _run([*submit[:-1], "--dry-run"], cwd=tmp_path)
    assert rendered.returncode == 0, _tail(rendered)
    last = rendered.stdout.strip().splitlines()[-1]
    assert last.startswith("srun --mpi=pmix ") and "podman run --rm --network=host --ipc=host" in last
    assert '--volume="$PWD:$PWD" --workdir="$PWD"' in last and f"{cpu_image} python -m jobs.train" in last
    result = _run(submit, cwd=tmp_path)
    assert result.returncode == 0, f"{_tail(result)}\n--- job log:\n{log.read_text()[-4000:] if log.exists() else ''}"
    records = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert {(r["rank"], r["world_size"], r["launcher"]) for r in records} == {(0, 2, "pmix"), (1, 2, "pmix")}
    # The image's mpi4py and Open MPI spoke PMIx with the host's Slurm: rank 0 sent its port through MPI.
    assert len({r["rendezvous"] for r in records}) == 1 and records[0]["rendezvous"].startswith("mpi:"), records
    # Each rank was the first process of its own container (its own PID namespace), not a process of this machine.
    assert [r["pid"] for r in records] == [1, 1], records


@pytest.mark.images
@pytest.mark.timeout(1800)
def test_gpu_dockerfile_builds_up_to_its_stage_before_the_cuda_wheels() -> None:
    result = _run(["bash", str(ROOT / "scripts" / "build_images.sh"), "gpu-base"], timeout=1500, cwd=ROOT)
    assert result.returncode == 0, _tail(result)
    tools = _in_image(GPU_BUILD_BASE, "bash", "-c", "g++ --version && cmake --version && mpicc --showme:version && "
                      "python -c 'import sys; print(sys.prefix)'")  # fmt: skip
    assert tools.returncode == 0 and "/opt/venv" in tools.stdout, _tail(tools)
    no_torch = _in_image(GPU_BUILD_BASE, "python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, _tail(no_torch)
    # The base is in podman's storage; its tar cache is made only when podman did not have it (a fresh clone on a
    # machine that built it before has no tar), so the storage is what is checked.
    base = _run(["podman", "image", "exists", "localhost/debian:bookworm-slim"], timeout=60)
    assert base.returncode == 0, "the debootstrap base is in podman's storage"
