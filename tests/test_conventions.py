"""The selectable K-FAC conventions (damping_form, conv_factors, g_scale) and the KL clip's report (kl_scale).

Each convention is checked against the dense float64 reference (tests/kfac_reference.py), which writes it out from
its formula. Two-rank runs of factored-pi, where one layer's A and G are decomposed on different ranks, are in
tests/test_distributed.py (configuration "comm-opt-inverse-factored-pi" of tests/dist_worker.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner, SingleProcessCommunicator
from distkfac.assignment import assign_work, grad_workers_for
from tests.kfac_reference import ReferenceKFAC
from tests.test_contract import batch, conv_model, linear_model, run_against_reference

MODELS: dict[str, Callable[[], nn.Sequential]] = {
    "linear-bias": lambda: linear_model(True),
    "linear-no-bias": lambda: linear_model(False),
    "conv": conv_model,
}
DEFINED = [
    ("eigen", "tikhonov"),
    ("eigen", "factored"),
    ("eigen", "factored-pi"),
    ("inverse", "factored"),
    ("inverse", "factored-pi"),
]


pytestmark = pytest.mark.usefixtures("float64_default")  # the contract is checked in float64 (conftest.py)


def one_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, **options: Any) -> KFACPreconditioner:
    """One preconditioned step (no optimizer step) on ``model`` with ``KFACPreconditioner(model, **options)``."""
    precond = KFACPreconditioner(model, **options)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    return precond


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# ------------------------------------------------------------------ damping forms


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(("method", "form"), DEFINED)
def test_damping_form_matches_reference(method: str, form: str, model: str) -> None:
    # inv_update_steps=2: steps 0 and 2 decompose, step 1 reuses step 0's decompositions.
    run_against_reference(
        MODELS[model], steps=3, compute_method=method, damping_form=form, kl_clip=None, damping=1e-2, inv_update_steps=2
    )


@pytest.mark.parametrize(("method", "form"), DEFINED)
def test_damping_schedule_acts_when_the_method_reads_damping(method: str, form: str) -> None:
    # eigen reads damping at every step; inverse at its decomposition steps (0 and 2 here), as the reference does.
    schedule = [3e-2, 1e-2, 5e-3, 2e-3]
    run_against_reference(
        conv_model,
        steps=4,
        compute_method=method,
        damping_form=form,
        damping=lambda step: schedule[step],
        inv_update_steps=2,
        kl_clip=None,
    )


def test_the_damping_forms_differ_on_these_models() -> None:
    """Otherwise the reference comparisons above could not tell the forms apart (e.g. pi = 1 everywhere)."""
    x, y = batch(conv_model(), 0)
    results = {}
    for method, form in DEFINED:
        torch.manual_seed(0)
        model = conv_model()
        one_step(model, x, y, compute_method=method, damping_form=form, kl_clip=None, damping=1e-2)
        results[(method, form)] = torch.cat([g.flatten() for g in grads_of(model)])
    # eigen and inverse compute the same V for factored and factored-pi; every form differs from the others.
    for form in ("factored", "factored-pi"):
        torch.testing.assert_close(results[("eigen", form)], results[("inverse", form)], rtol=1e-7, atol=1e-10)
    forms = [results[("eigen", form)] for form in ("tikhonov", "factored", "factored-pi")]
    for i in range(3):
        for j in range(i + 1, 3):
            relative = float((forms[i] - forms[j]).norm() / forms[j].norm())
            assert relative > 1e-2, f"forms {i} and {j} agree to {relative:.1e}"


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_default_damping_form_is_the_methods_historic_one(method: str) -> None:
    x, y = batch(linear_model(True), 0)
    historic = {"eigen": "tikhonov", "inverse": "factored"}[method]
    grads = []
    for form in (None, historic):
        torch.manual_seed(0)
        model = linear_model(True)
        precond = one_step(model, x, y, compute_method=method, damping_form=form, damping=1e-2)
        assert precond.damping_form == historic
        grads.append(grads_of(model))
    for default, explicit in zip(*grads, strict=True):
        assert torch.equal(default, explicit)


def test_inverse_with_tikhonov_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"damping_form='tikhonov' cannot be used with compute_method='inverse'") as e:
        KFACPreconditioner(linear_model(True), compute_method="inverse", damping_form="tikhonov")
    assert "compute_method='eigen'" in str(e.value)


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("damping_form", "pi", "'tikhonov', 'factored', 'factored-pi'"),
        ("conv_factors", "sum", "'mean', 'kfc'"),
        ("g_scale", "mean", "'example', 'batch'"),
    ],
)
def test_unknown_convention_names_the_choices(option: str, value: str, choices: str) -> None:
    with pytest.raises(ValueError, match=f"distkfac: {option} must be one of {choices}, got '{value}'"):
        options: dict[str, Any] = {option: value}
        KFACPreconditioner(linear_model(True), **options)


def dead_model() -> nn.Sequential:
    """Layer 0 outputs zeros: its G and layer 2's A are zero matrices (trace 0), and both gradients are zero."""
    first = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        first.weight.zero_()
    return nn.Sequential(first, nn.ReLU(), nn.Linear(5, 3, bias=False))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_factored_pi_takes_pi_1_for_a_zero_trace(method: str) -> None:
    # pi = 0 or inf there would make the inverse's Cholesky fail and eigen's denominators inf * 0 = NaN.
    run_against_reference(dead_model, steps=2, compute_method=method, damping_form="factored-pi", kl_clip=None)


# ------------------------------------------------------------------ factor conventions


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize(("conv_factors", "g_scale"), [("kfc", "example"), ("mean", "batch"), ("kfc", "batch")])
def test_factor_conventions_match_reference(method: str, conv_factors: str, g_scale: str) -> None:
    run_against_reference(
        conv_model,
        steps=3,
        compute_method=method,
        conv_factors=conv_factors,
        g_scale=g_scale,
        damping=1e-3,
        inv_update_steps=2,
        kl_clip=1e-3,  # G is up to N^2 smaller with "batch": unclipped steps of 1e4 would wreck the model
    )


@pytest.mark.parametrize("bias", [True, False])
def test_g_scale_batch_matches_reference_on_linear_layers(bias: bool) -> None:
    run_against_reference(lambda: linear_model(bias), steps=3, g_scale="batch", kl_clip=1e-3, damping=1e-3)


def factors(precond: KFACPreconditioner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in precond._layers:  # white-box: the running factors, equal to the batch's after one step
        assert layer.a_factor is not None and layer.g_factor is not None
        out.append((layer.a_factor, layer.g_factor))
    return out


def test_kfc_and_batch_rescale_the_factors_exactly() -> None:
    """kfc: conv A is T times "mean"'s, G unchanged; batch: G is 1/N^2 times "example"'s, A unchanged.

    N = 8 and T = 16 (4 x 4 output positions in both conv layers) are powers of two, so the rescaled factors are
    bit-identical to the products, and torch.equal can be used.
    """
    n, t = 8, 16
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 2, 7, 7, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    runs = {}
    for conv_factors, g_scale in (("mean", "example"), ("kfc", "example"), ("mean", "batch")):
        torch.manual_seed(0)
        precond = one_step(conv_model(), x, y, conv_factors=conv_factors, g_scale=g_scale)
        runs[(conv_factors, g_scale)] = factors(precond)
    is_conv = [True, True, False]  # conv_model: two Conv2d, then a Linear
    for (a_mean, g_mean), (a_kfc, g_kfc), conv in zip(
        runs["mean", "example"], runs["kfc", "example"], is_conv, strict=True
    ):
        assert torch.equal(a_kfc, a_mean * t if conv else a_mean)
        assert torch.equal(g_kfc, g_mean)
    for (a_ex, g_ex), (a_batch, g_batch) in zip(runs["mean", "example"], runs["mean", "batch"], strict=True):
        assert torch.equal(a_batch, a_ex)
        assert torch.equal(g_batch * n * n, g_ex)


def test_kfc_leaves_linear_layers_with_extra_dimensions_alone() -> None:
    x = torch.randn(4, 5, 6)  # 4 examples of 5 positions: one row per position, averaged over all 20 rows
    a = []
    for conv_factors in ("mean", "kfc"):
        torch.manual_seed(0)
        layer = nn.Linear(6, 3)
        precond = KFACPreconditioner(nn.Sequential(layer), conv_factors=conv_factors)
        layer(x).pow(2).mean().backward()
        precond.step()
        a.append(factors(precond)[0][0])
    rows = torch.cat([x.reshape(-1, 6), torch.ones(20, 1)], dim=1)
    torch.testing.assert_close(a[0], rows.t() @ rows / 20, rtol=1e-12, atol=1e-14)
    assert torch.equal(a[0], a[1])


# ------------------------------------------------------------------ KL clip report


def test_kl_scale_is_none_without_a_clip_and_before_the_first_step() -> None:
    x, y = batch(linear_model(True), 0)
    assert KFACPreconditioner(linear_model(True), kl_clip=1e-3).kl_scale is None
    assert one_step(linear_model(True), x, y, kl_clip=None).kl_scale is None


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("kl_clip", [1e-12, 1e6])
def test_kl_scale_reports_the_reference_nu(method: str, kl_clip: float) -> None:
    seen: list[float] = []

    def check(step: int, precond: KFACPreconditioner, reference: ReferenceKFAC) -> None:
        nu = precond.kl_scale
        assert isinstance(nu, float)
        assert nu == pytest.approx(reference.last_nu, rel=1e-9)
        seen.append(nu)

    run_against_reference(conv_model, steps=3, on_step=check, compute_method=method, kl_clip=kl_clip, damping=1e-2)
    if kl_clip < 1:
        assert all(nu < 1e-3 for nu in seen), seen
    else:
        assert seen == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_clipped_gradients_are_nu_times_the_unclipped_direction(method: str) -> None:
    torch.manual_seed(0)
    model = conv_model()
    twin = copy.deepcopy(model)
    x, y = batch(model, 0)
    clipped = one_step(model, x, y, compute_method=method, kl_clip=1e-12, damping=1e-2)
    one_step(twin, x, y, compute_method=method, kl_clip=None, damping=1e-2)
    nu = clipped.kl_scale
    assert nu is not None and nu < 1
    for got, direction in zip(grads_of(model), grads_of(twin), strict=True):
        torch.testing.assert_close(got, nu * direction, rtol=1e-12, atol=0.0)


def test_while_clipped_the_update_does_not_depend_on_lr() -> None:
    x, y = batch(conv_model(), 0)
    updates = []
    for lr in (0.1, 0.7):
        torch.manual_seed(0)
        model = conv_model()
        one_step(model, x, y, kl_clip=1e-12, lr=lr, damping=1e-2)
        updates.append([lr * g for g in grads_of(model)])
    for small, large in zip(*updates, strict=True):
        torch.testing.assert_close(small, large, rtol=1e-12, atol=0.0)


# ------------------------------------------------------------------ settings checks


class TwoRankFingerprints(SingleProcessCommunicator):
    """Pretends to be rank 0 of 2 and records the settings fingerprint the constructor compares across ranks."""

    world_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.digests: list[int] = []

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        self.digests.append(values[0])
        return [list(values), list(values)]


def test_conventions_are_in_the_cross_rank_fingerprint() -> None:
    variants: list[dict[str, Any]] = [
        {},
        {"damping_form": "factored"},
        {"damping_form": "factored-pi"},
        {"conv_factors": "kfc"},
        {"g_scale": "batch"},
    ]
    digests = []
    for options in variants:
        comm = TwoRankFingerprints()
        KFACPreconditioner(conv_model(), comm=comm, **options)
        digests.extend(comm.digests)
    assert len(digests) == len(variants) and len(set(digests)) == len(variants), digests


def test_repr_shows_the_conventions() -> None:
    text = repr(KFACPreconditioner(conv_model(), compute_method="inverse", conv_factors="kfc", g_scale="batch"))
    assert "damping_form='factored'" in text and "conv_factors='kfc'" in text and "g_scale='batch'" in text


def test_checkpoints_refuse_other_conventions() -> None:
    x, y = batch(conv_model(), 0)
    state = one_step(conv_model(), x, y, conv_factors="kfc").state_dict()
    with pytest.raises(ValueError, match="conv_factors"):
        KFACPreconditioner(conv_model()).load_state_dict(state)
    KFACPreconditioner(conv_model(), conv_factors="kfc").load_state_dict(state)
    # A checkpoint from before the conventions existed was made with the defaults.
    del state["conventions"]
    with pytest.raises(ValueError, match="conv_factors"):
        KFACPreconditioner(conv_model(), conv_factors="kfc").load_state_dict(state)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_checkpoints_and_damping_form(method: Literal["eigen", "inverse"]) -> None:
    """Eigen decompositions do not depend on the damping form, so it may change on resume; inverses bake it in."""
    x, y = batch(conv_model(), 0)
    state = one_step(conv_model(), x, y, compute_method=method, damping_form="factored").state_dict()
    resumed = KFACPreconditioner(conv_model(), compute_method=method, damping_form="factored-pi")
    if method == "eigen":
        resumed.load_state_dict(state)
    else:
        with pytest.raises(ValueError, match="damping_form"):
            resumed.load_state_dict(state)


@pytest.mark.parametrize("world", [2, 4])
def test_the_distributed_factored_pi_run_splits_a_layers_factors_over_ranks(world: int) -> None:
    """tests/test_distributed.py checks factored-pi + inverse in real ranks; that only tests the trace sharing if
    some layer's A and G are decomposed on different ranks, so that each needs the other rank's trace."""
    from tests import dist_worker

    config = dist_worker.CONFIGS["comm-opt-inverse-factored-pi"]
    assert "comm-opt-inverse-factored-pi" in dist_worker.EXACT
    assert config["compute_method"] == "inverse" and config["damping_form"] == "factored-pi"
    precond = KFACPreconditioner(dist_worker.make_model())
    dims = [(layer.helper.a_dim, layer.helper.g_dim) for layer in precond._layers]
    assignment = assign_work(dims, world, grad_workers_for(config["strategy"], None, world))
    assert any(work.a_owner != work.g_owner for work in assignment.layers)
