"""distkfac against the dense float64 reference of its documented contract (distkfac/preconditioner.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from tests.kfac_reference import ReferenceKFAC, layer_grads, per_example_stats

N = 12


pytestmark = pytest.mark.usefixtures("float64_default")  # the contract is checked in float64 (conftest.py)


def linear_model(bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 5, bias=bias), nn.ReLU(inplace=True), nn.Linear(5, 5, bias=bias), nn.Linear(5, 3, bias=bias)
    )


def conv_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, dilation=2, bias=False, padding="same"),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )


def batch(model: nn.Sequential, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    first = model[0]
    assert isinstance(first, nn.Linear | nn.Conv2d)
    shape = [N, 2, 7, 7] if isinstance(first, nn.Conv2d) else [N, first.in_features]
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (N,), generator=gen)


StepCheck = Callable[[int, KFACPreconditioner, ReferenceKFAC], None]


def run_against_reference(
    make_model: Callable[[], nn.Sequential], steps: int, on_step: StepCheck | None = None, **options: Any
) -> ReferenceKFAC:
    """Train ``steps`` steps with ``KFACPreconditioner(model, **options)`` and compare every gradient it writes with
    the dense reference given the same options. A callable ``damping`` is a schedule; ``on_step`` runs after each
    step's comparison."""
    torch.manual_seed(0)
    model = make_model()
    precond = KFACPreconditioner(model, **options)
    damping = options.get("damping", 1e-3)
    reference = ReferenceKFAC(
        damping=0.0,  # set each step below, from the schedule when there is one
        factor_decay=float(options.get("factor_decay", 0.95)),
        factor_update_steps=int(options.get("factor_update_steps", 1)),
        inv_update_steps=int(options.get("inv_update_steps", 10)),
        kl_clip=options.get("kl_clip", 1e-3),
        lr=float(options.get("lr", 0.1)),
        compute_method=str(options.get("compute_method", "eigen")),
        damping_form=options.get("damping_form"),
        conv_factors=str(options.get("conv_factors", "mean")),
        g_scale=str(options.get("g_scale", "example")),
        split_above=options.get("split_factors_above"),
        lagged=bool(options.get("async_decompositions", False)),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        reference.damping = float(damping(step) if callable(damping) else damping)
        x, y = batch(model, step)
        expected = reference.step(per_example_stats(model, x, y))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        for layer, (got, want) in enumerate(zip(layer_grads(model), expected, strict=True)):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11, msg=f"step {step}, layer {layer}")
        if on_step is not None:
            on_step(step, precond, reference)
        optimizer.step()
    return reference


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(method: str, bias: bool) -> None:
    run_against_reference(lambda: linear_model(bias), steps=3, compute_method=method, kl_clip=None, damping=3e-2)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_conv2d_matches_reference(method: str) -> None:
    run_against_reference(conv_model, steps=3, compute_method=method, kl_clip=None, damping=1e-2)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_kl_clip_scales_by_nu(method: str) -> None:
    reference = run_against_reference(
        lambda: linear_model(True), steps=3, compute_method=method, kl_clip=1e-4, lr=0.5, damping=1e-2
    )
    assert reference.last_nu < 0.5, "kl_clip was meant to bite in this test"


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_decay_and_update_intervals(method: str) -> None:
    run_against_reference(
        conv_model,
        steps=7,
        compute_method=method,
        factor_decay=0.7,
        factor_update_steps=2,
        inv_update_steps=3,
        kl_clip=1e-2,
        damping=1e-2,
    )


def test_mc_fisher_uses_sampled_labels_and_leaves_grads() -> None:
    torch.manual_seed(0)
    model = linear_model(True)
    precond = KFACPreconditioner(model, fisher="mc", kl_clip=None, damping=1e-2)
    x, y = batch(model, 0)
    with torch.no_grad():  # no_grad: the preconditioner's hooks must not see this pass
        logits_for_sampling = model(x)
    torch.manual_seed(7)
    sampled = torch.multinomial(torch.softmax(logits_for_sampling.float(), -1), 1).view(-1)
    stats = per_example_stats(model, x, y, sampled_y=sampled)
    reference = ReferenceKFAC(1e-2, 0.95, 1, 10, None, 0.1, "eigen")
    expected = reference.step(stats)

    logits = model(x)
    torch.manual_seed(7)
    precond.mc_backward(logits)
    assert all(p.grad is None for p in model.parameters()), "mc_backward must not touch .grad"
    F.cross_entropy(logits, y).backward()
    precond.step()
    for got, want in zip(layer_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_mc_fisher_without_sampling_is_an_error() -> None:
    model = linear_model(True)
    precond = KFACPreconditioner(model, fisher="mc")
    x, y = batch(model, 0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        precond.step()


def test_gradient_accumulation_averages_batch_factors() -> None:
    torch.manual_seed(0)
    model = linear_model(True)
    precond = KFACPreconditioner(model, kl_clip=None, damping=1e-2)
    (x1, y1), (x2, y2) = batch(model, 0), batch(model, 1)
    s1, s2 = per_example_stats(model, x1, y1), per_example_stats(model, x2, y2)
    reference = ReferenceKFAC(1e-2, 0.95, 1, 10, None, 0.1, "eigen")
    for one, two in zip(s1, s2, strict=True):
        # Two mean losses summed: the gradient is the sum, the factors the mean of the two passes.
        one.a, one.g, one.grad = torch.cat([one.a, two.a]), torch.cat([one.g, two.g]), one.grad + two.grad
    expected = reference.step(s1)
    (F.cross_entropy(model(x1), y1) + F.cross_entropy(model(x2), y2)).backward()
    precond.step()
    for got, want in zip(layer_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_damping_schedule_is_read_every_step_by_eigen() -> None:
    schedule = [3e-2, 1e-2, 5e-3]
    torch.manual_seed(0)
    model = linear_model(True)
    precond = KFACPreconditioner(model, damping=lambda step: schedule[step], kl_clip=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reference = ReferenceKFAC(0.0, 0.95, 1, 10, None, 0.1, "eigen")
    for step, damping in enumerate(schedule):
        reference.damping = damping
        x, y = batch(model, step)
        expected = reference.step(per_example_stats(model, x, y))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        for got, want in zip(layer_grads(model), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)
        optimizer.step()


def test_skipped_and_unsupported_layers_keep_plain_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4), nn.Linear(4, 3))
    precond = KFACPreconditioner(model, skip_layers=("2", nn.LayerNorm))
    assert precond.layer_names == ["0", "3"]
    x, y = torch.randn(N, 6), torch.randint(0, 3, (N,))
    F.cross_entropy(model(x), y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    precond.step()
    for name, p in model.named_parameters():
        assert p.grad is not None
        changed = not torch.equal(p.grad, plain[name])
        assert changed == (name.split(".")[0] in ("0", "3")), name


def test_mc_fisher_gaussian_likelihood_uses_sampled_noise() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    precond = KFACPreconditioner(nn.Sequential(layer), fisher="mc")
    x = torch.randn(N, 4)
    out = layer(x)
    torch.manual_seed(5)
    noise = torch.randn_like(out)
    torch.manual_seed(5)
    precond.mc_backward(out, likelihood="gaussian")
    ((out - torch.randn(N, 3)) ** 2).mean().backward()
    precond.step()
    # Loss 0.5 |f - y|^2 with y = f + noise: the per-example output gradient is -noise.
    g_factor = precond._layers[0].g_factor
    assert g_factor is not None
    torch.testing.assert_close(g_factor, noise.t() @ noise / N, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_split_factors_are_their_block_diagonals(method: str) -> None:
    """Factors above ``split_factors_above`` are replaced by their diagonal blocks (the conv model's A sides are
    19, 12 and 33: 3, 2 and 5 blocks of at most 8), and each block is decomposed on its own."""

    def blocks_were_split(step: int, precond: KFACPreconditioner, reference: ReferenceKFAC) -> None:
        sizes = sorted(block.size for block, _ in precond.assignment.blocks if block.key.kind == "A")
        assert max(sizes) <= 8 and len(sizes) == 10, sizes

    run_against_reference(
        conv_model,
        steps=4,
        on_step=blocks_were_split,
        compute_method=method,
        damping_form="factored-pi",
        split_factors_above=8,
        inv_update_steps=2,
        kl_clip=None,
        damping=1e-2,
    )


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_asynchronous_decompositions_are_the_synchronous_ones_one_interval_late(method: str) -> None:
    """``async_decompositions=True`` gives, step for step, the synchronous contract with each decomposition step
    installing the factors (and, for the inverse method, the damping) of the previous decomposition step; the first
    decomposition is synchronous. A damping schedule shows that the shifts are those of the step that started it."""

    def staleness(step: int, precond: KFACPreconditioner, reference: ReferenceKFAC) -> None:
        expected = step if step < 3 else 3 + step % 3
        assert precond.decomposition_staleness == expected

    run_against_reference(
        conv_model,
        steps=10,
        on_step=staleness,
        compute_method=method,
        async_decompositions=True,
        inv_update_steps=3,
        kl_clip=1e-2,
        damping=lambda step: 1e-2 * (1 + step),
    )
