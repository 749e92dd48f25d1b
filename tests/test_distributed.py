"""Data-parallel K-FAC in real processes: torchrun + gloo, Horovod and MPI under mpirun, and ranks started one by one.

Each launch trains every configuration of ``tests/dist_worker.py`` once; the tests compare what each rank saved with
one process trained on the full batches.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import dist_worker
from tests.processes import ENV, MPI_ENV, PYTHON, ROOT

LAUNCH_TIMEOUT = 600


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@cache
def launched(backend: str, world: int, out_root: Path, *extra: str) -> Path:
    out = out_root / "-".join([backend, str(world), *extra])
    worker = ["-m", "tests.dist_worker", "--backend", backend, "--out", str(out), *extra]
    if backend == "torch":
        torchrun = str(Path(PYTHON).with_name("torchrun"))
        _run([torchrun, "--standalone", f"--nproc-per-node={world}", *worker], ENV)
    else:
        _run(["mpirun", "-np", str(world), "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", PYTHON, *worker], MPI_ENV)
    return out


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@cache
def reference(name: str) -> dict[str, torch.Tensor]:
    """One process on the full batches (the strategy means nothing there)."""
    config = {k: v for k, v in dist_worker.CONFIGS[name].items() if k not in ("strategy", "grad_worker_fraction")}
    torch.set_num_threads(1)
    return dist_worker.train(config, 0, 1, "single").state_dict()


def _saved(out: Path, name: str, world: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"{name}.rank{rank}.pt") for rank in range(world)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


BACKENDS = (
    [("torch", name) for name in dist_worker.EXACT]
    + [("horovod", name) for name in dist_worker.HOROVOD_CONFIGS if name in dist_worker.EXACT]
    + [("mpi", name) for name in dist_worker.EXACT]
)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("backend", "name"), BACKENDS)
def test_ranks_match_one_process_on_the_full_batch(backend: str, name: str, world: int, out_root: Path) -> None:
    out = launched(backend, world, out_root)
    want = reference(name)
    start = dist_worker.make_model(dist_worker.CONFIGS[name].get("model", "cnn")).state_dict()
    assert _max_diff(want, start) > 1e-3, "the reference did not train"
    for rank, got in enumerate(_saved(out, name, world)):
        diff = _max_diff(got, want)
        assert diff <= 1e-5, f"{backend} P={world} {name}: rank {rank} is {diff:.2e} from one process"


def test_kfac_direction_differs_from_sgd_so_equivalence_means_something() -> None:
    kfac = reference("comm-opt")
    torch.manual_seed(0)
    model = dist_worker.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in dist_worker.load_batches():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert _max_diff(model.state_dict(), kfac) > 1e-2


@pytest.mark.parametrize(("backend", "world"), [("torch", 2), ("torch", 4), ("horovod", 4), ("mpi", 4)])
def test_low_precision_factor_comm_keeps_ranks_identical(backend: str, world: int, out_root: Path) -> None:
    out = launched(backend, world, out_root)
    saved = _saved(out, "mem-opt-fp16-comm", world)
    for rank, got in enumerate(saved):
        assert _max_diff(got, saved[0]) == 0.0, f"rank {rank} applied a different update than rank 0"
    # float16 factors are not float64 ones, but the step must stay close.
    assert _max_diff(saved[0], reference("mem-opt-fp16-comm")) < 1e-2  # one process: nothing travels


def _stats(out: Path, name: str) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads((out / f"{name}.rank0.json").read_text())
    return stats["bytes"]


@pytest.mark.parametrize("world", [2, 4])
def test_strategies_send_what_they_promise(world: int, out_root: Path) -> None:
    out = launched("torch", world, out_root)
    comm_opt, mem_opt, hybrid = (_stats(out, name) for name in ("comm-opt", "mem-opt", "hybrid"))
    baseline = _stats(out, "hybrid-allreduce-baseline")
    assert "gradients" not in comm_opt, "comm-opt must not broadcast preconditioned gradients"
    assert "decompositions" not in mem_opt, "mem-opt must not share decompositions"
    assert mem_opt["gradients"] > 0 and comm_opt["decompositions"] > 0
    if world == 4:
        assert 0 < hybrid["decompositions"] < comm_opt["decompositions"]
        assert 0 < hybrid["gradients"] < mem_opt["gradients"]
    # Packed triangles reduced to one owner, against full matrices allreduced to all: about 4x fewer bytes.
    assert baseline["factors"] > 3.5 * hybrid["factors"]
    fp16 = _stats(out, "mem-opt-fp16-comm")
    assert fp16["factors"] == pytest.approx(mem_opt["factors"] / 4)  # float16 against float64


@pytest.mark.parametrize(("backend", "world"), [("torch", 2), ("torch", 4), ("horovod", 2), ("mpi", 4)])
def test_factor_reductions_start_during_backward(backend: str, world: int, out_root: Path) -> None:
    out = launched(backend, world, out_root)

    def in_flight(name: str) -> list[int]:
        return list(json.loads((out / f"{name}.rank0.json").read_text())["in_flight_after_backward"])

    assert all(n >= 1 for n in in_flight("comm-opt")), "backward returned with no factor reduction started"
    # Tiny buckets, two passes: every bucket of both passes has started by the end of backward.
    assert all(n >= 4 for n in in_flight("comm-opt-accumulate"))
    if backend == "torch":
        assert in_flight("hybrid-allreduce-baseline") == [0] * dist_worker.STEPS  # overlap_comm=False


@pytest.mark.parametrize("world", [2, 4])
def test_mpi_sends_the_bytes_of_torch_distributed(world: int, out_root: Path) -> None:
    torch_out, mpi_out = launched("torch", world, out_root), launched("mpi", world, out_root)
    for name in dist_worker.CONFIGS:
        by_torch, by_mpi = (json.loads((out / f"{name}.rank0.json").read_text()) for out in (torch_out, mpi_out))
        if dist_worker.CONFIGS[name].get("ddp"):  # DDP averages the gradients over gloo, out of the counters
            by_mpi["bytes"].pop("gradient averaging")
        assert by_mpi["bytes"] == pytest.approx(by_torch["bytes"]), name


def test_one_factor_reduction_per_bucket_whatever_the_number_of_ranks(out_root: Path) -> None:
    """A bucket's factors reach their owners in one collective (a reduce-scatter of unequal segments), so the count
    is the same at P = 2 and 4, over gloo and over MPI."""
    outs = {(backend, world): launched(backend, world, out_root) for backend in ("torch", "mpi") for world in (2, 4)}
    for name in dist_worker.CONFIGS:
        calls = {key: json.loads((out / f"{name}.rank0.json").read_text())["calls"] for key, out in outs.items()}
        factor_calls = {key: count.get("factors", 0) for key, count in calls.items()}
        assert len(set(factor_calls.values())) == 1 and factor_calls[("torch", 2)] > 0, (name, factor_calls)


def test_one_reduce_per_owner_on_request_trains_alike(out_root: Path) -> None:
    """``owner_reduction="each"`` (faster on gloo over loopback): the same parameters, one reduce per owner."""
    each, scatter = launched("torch", 4, out_root, "--owner-reduction", "each"), launched("torch", 4, out_root)
    for name in ("comm-opt", "mem-opt", "hybrid"):
        for rank, got in enumerate(_saved(each, name, 4)):
            assert _max_diff(got, reference(name)) <= 1e-5, f"{name}: rank {rank}"
        calls = [json.loads((out / f"{name}.rank0.json").read_text())["calls"]["factors"] for out in (each, scatter)]
        assert calls[0] > calls[1], f"{name}: {calls[0]} reduces against {calls[1]} reduce-scatters"


def test_bad_gradient_worker_fraction_is_refused_on_every_rank(out_root: Path) -> None:
    out = launched("torch", 4, out_root)
    for rank in range(4):
        message = json.loads((out / f"errors.rank{rank}.json").read_text())["fraction"]
        assert "grad_worker_fraction=0.3" in message and "1/4" in message and "2/4" in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_ranks(world: int, scenario: str, out: Path, timeout: float) -> list[subprocess.Popen[str]]:
    """Each rank as its own process (no torchrun: its agent would kill the survivors as soon as one rank fails)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": str(world)}
        command = [PYTHON, "-m", "tests.dist_worker", "--backend", "torch", "--scenario", scenario]
        command += ["--out", str(out), "--timeout", str(timeout)]
        procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(proc: subprocess.Popen[str], limit: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"rank did not finish within {limit:.0f} s (it hangs):\n{err[-3000:]}")
    return proc.returncode, err


def test_a_rank_that_dies_mid_step_makes_the_others_fail_clearly(tmp_path: Path) -> None:
    procs = _start_ranks(3, "die", tmp_path, timeout=60)
    codes = [_finish(proc, 180) for proc in procs]
    assert codes[1][0] == 3  # the rank that died on purpose
    for rank in (0, 2):
        code, err = codes[rank]
        assert code != 0
        assert "distkfac.comm.base.CommunicationError" in err and "Another rank has probably died" in err, err[-3000:]


def test_a_rank_that_hangs_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    procs = _start_ranks(2, "hang", tmp_path, timeout=5)
    try:
        started = time.monotonic()
        code, err = _finish(procs[0], 120)
        elapsed = time.monotonic() - started
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code != 0 and "CommunicationError" in err and "rank 0 of 2" in err, err[-3000:]
    assert elapsed >= 5  # it waited for the timeout rather than failing for another reason


def test_ranks_with_different_models_are_told_so(tmp_path: Path) -> None:
    procs = _start_ranks(2, "mismatch", tmp_path, timeout=60)
    for proc in procs:
        code, err = _finish(proc, 120)
        assert code == 2, err[-3000:]
        assert "the ranks disagree on the model" in err and "ranks [1] differ from rank 0" in err


@pytest.mark.parametrize("world", [2, 4])
def test_scale_model_predicts_the_bytes_and_calls_of_every_rank(world: int, out_root: Path) -> None:
    """benchmarks/scale_model/ counts, from the exchanges' plans and the cost model alone, exactly the bytes and
    collectives each rank counted over gloo, purpose by purpose, for every configuration (DDP ones average their
    gradients outside the counters; two passes launch every bucket twice; asynchronous decompositions are shared one
    interval late)."""
    from benchmarks import scale_model

    out = launched("torch", world, out_root)
    interval = dist_worker.KFAC_DEFAULTS["inv_update_steps"]
    default = scale_model.Schedule(inv_update_steps=interval, factor_update_steps=1)
    for name, settings in dist_worker.CONFIGS.items():
        model = settings.get("model", "cnn")
        images = torch.zeros(dist_worker.BATCH // world, 1, 28, 28, dtype=torch.float64)
        example = dist_worker.image_rows_as_tokens(images) if model == "sequence" else images
        layer_set = scale_model.layer_set_from_module(model, dist_worker.make_model(model), example)
        config = scale_model.Config.from_settings(settings)
        schedule = scale_model.Config.schedule_from(settings, default)
        for rank in range(world):
            measured = json.loads((out / f"{name}.rank{rank}.json").read_text())
            traffic = scale_model.traffic(layer_set, config, world, rank)
            stats = scale_model.run_stats(traffic, dist_worker.STEPS, schedule, config.passes, config.asynchronous)
            assert dict(stats.bytes_sent) == pytest.approx(measured["bytes"], rel=1e-12), (name, rank)
            assert dict(stats.calls) == measured["calls"], (name, rank)
