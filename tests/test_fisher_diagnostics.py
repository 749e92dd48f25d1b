"""``distkfac.diagnostics``: per-example gradients against a loop of single-example backward passes, the three
eigen routes against a dense ``eigh`` of ``F`` built explicitly, the trimmed eigenvalue and the MAD counts on planted
data, bad inputs, and two gloo ranks against one process (``tests/fisher_worker.py``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac.diagnostics import (
    choose_method,
    eigenvalue_matches_projections,
    gradient_norms,
    mad_outliers,
    mean_squared_projection,
    median,
    parameter_names,
    per_example_gradients,
    projections,
    top_eigenpairs,
    trimmed_top_eigenvalue,
)
from distkfac.diagnostics.per_example import factorable_layers, linear_factors
from distkfac.diagnostics.spectrum import DENSE_MAX_WIDTH, FACTORED_DENSE_MAX_WIDTH
from tests import fisher_worker
from tests.processes import ENV, PYTHON, ROOT

pytestmark = pytest.mark.usefixtures("float64_default")
LIMIT_S = 60


def conv_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


def sequence_model() -> nn.Module:
    """A Linear layer on (n, T, features): its per-example gradient sums over the T positions."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(4, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.mix(x)).mean(dim=1))

    torch.manual_seed(3)
    return Pooled()


def looped_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The reference: one backward pass per example, in a Python loop."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[name] for name in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def explicit_fisher(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense eigenpairs of F = (1/N) sum g_i g_i^T built by an explicit sum of outer products, descending."""
    fisher = sum(torch.outer(g, g) for g in rows) / len(rows)
    assert isinstance(fisher, torch.Tensor)
    values, vectors = torch.linalg.eigh(fisher)
    return values.flip(0), vectors.flip(1)


def assert_same_pairs(got: Any, values: torch.Tensor, vectors: torch.Tensor, k: int, tol: float = 1e-10) -> None:
    torch.testing.assert_close(got.values, values[:k], atol=tol, rtol=tol)
    # eigenvectors up to sign; the routes fix the sign the same way, which the 2-rank test relies on
    overlaps = (got.vectors.T @ vectors[:, :k]).diagonal().abs()
    torch.testing.assert_close(overlaps, torch.ones(k), atol=1e-8, rtol=0)


@pytest.fixture
def mlp_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return fisher_worker.model(), fisher_worker.examples()


# --- per-example gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["0", "2"])
def test_linear_layer_rows_equal_single_example_backward_passes(mlp_data: Any, layer: str) -> None:
    model, (x, y) = mlp_data
    batches = [(x[:15], y[:15]), (x[15:], y[15:])]  # an iterator of batches, split again into chunks of 4
    chunks = list(per_example_gradients(model, iter(batches), layer=layer, chunk_size=4))
    assert max(len(c) for c in chunks) == 4
    want = looped_gradients(model, x, y, parameter_names(model, layer))
    torch.testing.assert_close(torch.cat(chunks), want, atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in model.parameters()), "the model's .grad must be left alone"


def test_linear_rows_sum_over_a_sequence_dimension() -> None:
    model = sequence_model()
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    got = torch.cat(list(per_example_gradients(model, (x, y), layer="mix", chunk_size=4)))
    torch.testing.assert_close(got, looped_gradients(model, x, y, ["mix.weight", "mix.bias"]), atol=1e-12, rtol=1e-10)


def test_conv2d_layer_rows_equal_single_example_backward_passes() -> None:
    model = conv_model()
    x, y = torch.randn(9, 2, 5, 5), torch.randint(0, 4, (9,))
    got = torch.cat(list(per_example_gradients(model, (x, y), layer="0", chunk_size=4)))
    assert got.shape == (9, 3 * 2 * 3 * 3 + 3)
    torch.testing.assert_close(got, looped_gradients(model, x, y, ["0.weight", "0.bias"]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("make", [fisher_worker.model, conv_model], ids=["mlp", "conv"])
def test_whole_model_rows_equal_single_example_backward_passes(make: Any) -> None:
    model = make()
    x = fisher_worker.examples()[0][:11] if make is fisher_worker.model else torch.randn(11, 2, 5, 5)
    y = torch.randint(0, 3, (11,))
    got = torch.cat(list(per_example_gradients(model, (x, y), chunk_size=5)))
    names = [name for name, _ in model.named_parameters()]
    assert parameter_names(model) == names
    torch.testing.assert_close(got, looped_gradients(model, x, y, names), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layer", ["0", "2", None], ids=["first", "last", "model"])
def test_linear_factors_give_the_rows_their_products_and_norms(mlp_data: Any, layer: str | None) -> None:
    model, (x, y) = mlp_data
    factors = linear_factors(model, iter([(x[:15], y[:15]), (x[15:], y[15:])]), layer, chunk_size=4)
    want = looped_gradients(model, x, y, parameter_names(model, layer))
    assert (len(factors), factors.width) == want.shape
    torch.testing.assert_close(torch.cat(list(factors.explicit())), want, atol=1e-12, rtol=1e-10)
    v, u = torch.randn(want.shape[1]), torch.randn(len(x))
    torch.testing.assert_close(factors.matvec(v), want @ v, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(factors.rmatvec(u), want.T @ u, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gradient_norms(factors), want.norm(dim=1), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(projections(factors, v), want @ v, atol=1e-12, rtol=1e-10)
    values, vectors = explicit_fisher(want)
    for method in ("lanczos", "eigh"):
        assert_same_pairs(top_eigenpairs(factors, 3, method), values, vectors, 3)
    trimmed, explicit = trimmed_top_eigenvalue(factors, 0.1, method="lanczos"), trimmed_top_eigenvalue(want, 0.1)
    assert (trimmed.full, trimmed.fixed, trimmed.recomputed) == pytest.approx(
        (explicit.full, explicit.fixed, explicit.recomputed), rel=1e-9
    )
    assert all(p.grad is None for p in model.parameters()), "the model's .grad must be left alone"


def test_only_linear_layers_on_feature_vectors_are_factored() -> None:
    assert factorable_layers(conv_model()) is None and factorable_layers(conv_model(), "3") == ["3"]
    with pytest.raises(ValueError, match="are not all Linear layers'"):
        linear_factors(conv_model(), (torch.randn(3, 2, 5, 5), torch.randint(0, 4, (3,))))
    with pytest.raises(ValueError, match=r"on \(n, features\) inputs"):
        linear_factors(sequence_model(), (torch.randn(6, 5, 4), torch.randint(0, 3, (6,))), "mix")


# --- the spectrum --------------------------------------------------------------------------------------------------


def whole_model_rows(count: int) -> torch.Tensor:
    model, (x, y) = fisher_worker.model(), fisher_worker.examples()
    rows = torch.cat(list(per_example_gradients(model, (x[:count], y[:count]))))
    assert rows.shape == (count, 75)
    return rows


@pytest.mark.parametrize("count", [20, 40])
@pytest.mark.parametrize("method", ["eigh", "gram", "lanczos"])
def test_every_route_gives_the_explicit_fishers_top_eigenpairs(count: int, method: str) -> None:
    rows = whole_model_rows(count)  # d = 75 > N: the Gram route's case, and a rank-N Fisher for Lanczos
    values, vectors = explicit_fisher(rows)
    got = top_eigenpairs(rows, 3, method)
    assert (got.method, got.count) == (method, count)
    assert_same_pairs(got, values, vectors, 3)


def test_lanczos_on_chunks_recomputed_every_pass_matches_dense(mlp_data: Any) -> None:
    model, data = mlp_data
    passes = []

    def rows() -> Any:
        passes.append(1)
        return per_example_gradients(model, data, chunk_size=6)

    values, vectors = explicit_fisher(torch.cat(list(rows())))
    got = top_eigenpairs(rows, 4, "lanczos")
    assert_same_pairs(got, values, vectors, 4)
    assert len(passes) > 5, "Lanczos must pass over the chunks once per step, never holding J"


def test_lanczos_stops_once_the_top_pair_has_converged() -> None:
    generator = torch.Generator().manual_seed(4)
    scales = torch.cat([torch.tensor([30.0, 10.0]), torch.ones(298)])
    matrix = torch.randn(600, 300, generator=generator) * scales
    values, vectors = explicit_fisher(matrix)
    passes: list[int] = []

    def rows() -> Any:
        passes.append(1)
        return [matrix]

    got = top_eigenpairs(rows, 1, "lanczos")
    assert_same_pairs(got, values, vectors, 1, tol=1e-10)
    early = len(passes)
    passes.clear()
    top_eigenpairs(rows, 1, "lanczos", tol=0)  # every one of the default 60 steps
    assert early < 30 < len(passes) == 61, (early, len(passes))  # one pass counts the rows
    with pytest.raises(ValueError, match="tol must be >= 0"):
        top_eigenpairs(matrix, 1, "lanczos", tol=-1.0)


def test_lanczos_with_few_steps_still_finds_a_well_separated_top_pair() -> None:
    generator = torch.Generator().manual_seed(4)
    scales = torch.cat([torch.tensor([30.0, 10.0]), torch.ones(298)])
    rows = torch.randn(600, 300, generator=generator) * scales
    values, vectors = explicit_fisher(rows)
    got = top_eigenpairs(rows, 1, "lanczos", steps=40)
    assert_same_pairs(got, values, vectors, 1, tol=1e-8)


def test_auto_picks_eigh_for_small_d_then_gram_for_few_examples_then_lanczos() -> None:
    assert choose_method(10_000, DENSE_MAX_WIDTH, 1) == "eigh"
    assert choose_method(300, 100_000, 1) == "gram"
    assert choose_method(100_000, 100_000, 1) == "lanczos"
    assert choose_method(2_000, 100_000, 1) == "lanczos", "N d above the Gram budget"
    assert top_eigenpairs(whole_model_rows(20), 1).method == "eigh"
    # Linear factors: products without rows, so Lanczos above a small width, and never the Gram route
    assert choose_method(10_000, FACTORED_DENSE_MAX_WIDTH, 1, factored=True) == "eigh"
    assert choose_method(10_000, FACTORED_DENSE_MAX_WIDTH + 1, 1, factored=True) == "lanczos"
    assert choose_method(300, 100_000, 1, factored=True) == "lanczos"


def test_the_top_eigenvalue_is_the_mean_squared_projection(mlp_data: Any) -> None:
    model, data = mlp_data
    rows = torch.cat(list(per_example_gradients(model, data)))
    top = top_eigenpairs(rows, 2)
    a = projections(rows, top.vectors[:, 0])
    torch.testing.assert_close(a, rows @ top.vectors[:, 0])
    assert mean_squared_projection(a) == pytest.approx(float(top.values[0]), rel=1e-12)
    assert eigenvalue_matches_projections(float(top.values[0]), a, rtol=1e-10)
    assert not eigenvalue_matches_projections(float(top.values[1]), a, rtol=1e-10)


# --- the trimmed eigenvalue -----------------------------------------------------------------------------------------


def planted_rows() -> torch.Tensor:
    """Two examples of 10 e_1 carry the top direction; 18 small ones are (0.5, +-1). The cross terms cancel, so by
    hand F = diag((2*100 + 18*0.25)/20, 18/20) = diag(10.225, 0.9), v_1 = e_1, a = +-10 twice and 0.5 eighteen times.
    Without the top 10% (the two large ones, N' = 18): fixed = 18*0.25/18 = 0.25; F' = diag(0.25, 1), so
    recomputed = 1."""
    small = torch.tensor([[0.5, 1.0], [0.5, -1.0]]).repeat(9, 1)
    rows = torch.cat([small[:7], torch.tensor([[10.0, 0.0]]), small[7:], torch.tensor([[-10.0, 0.0]])])
    assert rows.shape == (20, 2)
    return rows


@pytest.mark.parametrize("method", ["eigh", "lanczos"])
def test_trimming_the_top_tenth_of_projections_on_a_planted_spectrum(method: str) -> None:
    trimmed = trimmed_top_eigenvalue(planted_rows(), method=method)
    assert trimmed.full == pytest.approx(10.225, rel=1e-12)
    assert trimmed.fixed == pytest.approx(0.25, rel=1e-12)
    assert trimmed.recomputed == pytest.approx(1.0, rel=1e-12)
    assert (trimmed.removed, trimmed.kept, trimmed.count) == (2, 18, 20)
    assert trimmed.threshold == pytest.approx(10.0)


def test_trimming_nothing_keeps_the_full_eigenvalue() -> None:
    trimmed = trimmed_top_eigenvalue(planted_rows(), fraction=0.04)  # floor(0.04 * 20) = 0 removed
    assert trimmed.removed == 0
    assert trimmed.fixed == pytest.approx(trimmed.full, rel=1e-12)
    assert trimmed.recomputed == pytest.approx(trimmed.full, rel=1e-12)


# --- MAD outliers ---------------------------------------------------------------------------------------------------


def test_mad_counts_on_planted_outliers() -> None:
    base = torch.linspace(10, 11, 95)
    values = torch.cat([base[:40], torch.tensor([100.0, 0.0, 120.0]), base[40:], torch.tensor([0.0, 150.0])])
    centre = float(np.median(values.numpy()))
    mad = float(np.median(np.abs(values.numpy() - centre)))
    counts = mad_outliers(values, k=10)
    assert (counts.median, counts.mad, counts.count) == (pytest.approx(centre), pytest.approx(mad), 100)
    assert counts.deviating == 5, "the three large and two zero values lie more than 10 MAD from the median"
    # the paper's literal rule compares x_i itself with 10 MAD: every base value (about 10 against 10 MAD ~ 2.6)
    assert counts.above == 95 + 3


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert float(median(torch.tensor([4.0, 1.0, 3.0, 2.0]))) == 2.5
    assert float(median(torch.tensor([3.0, 1.0, 2.0]))) == 2.0


def test_gradient_norms_are_the_rows_norms(mlp_data: Any) -> None:
    model, data = mlp_data
    rows = torch.cat(list(per_example_gradients(model, data)))
    norms = gradient_norms(lambda: per_example_gradients(model, data, chunk_size=7))
    torch.testing.assert_close(norms, rows.norm(dim=1))


# --- bad input ------------------------------------------------------------------------------------------------------


def test_an_unknown_layer_names_the_layers(mlp_data: Any) -> None:
    model, data = mlp_data
    with pytest.raises(ValueError, match=r"no layer 'fc9'.*\['0', '2'\]"):
        next(per_example_gradients(model, data, layer="fc9"))


@pytest.mark.parametrize("k", [0, -1])
def test_fewer_than_one_eigenpair_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        top_eigenpairs(planted_rows(), k)


@pytest.mark.parametrize("k", [0.0, -2.0])
def test_a_non_positive_mad_multiple_is_refused(k: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        mad_outliers(torch.ones(5), k=k)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        trimmed_top_eigenvalue(planted_rows(), fraction=fraction)


def test_empty_data_is_refused(mlp_data: Any) -> None:
    model, _ = mlp_data
    with pytest.raises(ValueError, match="empty data"):
        list(per_example_gradients(model, (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))))
    with pytest.raises(ValueError, match="empty data"):
        top_eigenpairs(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="empty data"):
        mad_outliers(torch.zeros(0))


def test_other_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenpairs(planted_rows(), 1, method="power")
    with pytest.raises(ValueError, match="3 eigenpairs asked of a 2-dimensional"):
        top_eigenpairs(planted_rows(), 3)
    with pytest.raises(ValueError, match="Gram route gives at most N = 2"):
        top_eigenpairs(torch.randn(2, 5), 3, method="gram")


# --- two ranks ------------------------------------------------------------------------------------------------------


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda text: f"{prefix}: {text}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_give_the_single_process_results(tmp_path: Path) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
        command = [PYTHON, "-m", "tests.fisher_worker", "--out", str(tmp_path)]
        procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=LIMIT_S)
            assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    from distkfac.comm import SingleProcessCommunicator

    want = fisher_worker.diagnostics(SingleProcessCommunicator())
    numbers = {name: {key: value for key, value in got.items() if key != "method"} for name, got in want.items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"fisher.rank{rank}.pt")
        for name in ("lanczos", "eigh", "gram"):
            assert got[name].pop("method") == want[name]["method"] == name
        assert got["factored"].pop("method") == "lanczos"
        torch.testing.assert_close(got, numbers, atol=1e-10, rtol=1e-10, msg=_prefixed(f"rank {rank}"))
    assert want["trimmed"]["removed"] == 4 and want["mad"]["count"] == fisher_worker.COUNT
    torch.testing.assert_close(numbers["factored"], numbers["lanczos"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(numbers["factored_trimmed"], numbers["trimmed"], atol=1e-10, rtol=1e-10)
    assert 0 < want["mad_7"]["above"] < fisher_worker.COUNT, "the global median must decide, not a rank's own"
