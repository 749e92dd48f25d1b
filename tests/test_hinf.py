"""distkfac.hinf: the g-EHF update against a direct dense computation of seed 001's equations 3 to 6, the
information-form identity (eq. 7), the multi-output generalisation at m = 1, steepest descent, the optimizer's
interface, and a network whose P would not fit refused before any allocation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from distkfac.hinf import HInfinity, ehf_update, full_matrix, riccati_bytes, steepest_update, symmetric_matmul

pytestmark = pytest.mark.usefixtures("float64_default")
GAMMA = 1.7


def dense_equations(p: torch.Tensor, w: torch.Tensor, h: torch.Tensor, e: torch.Tensor, gamma: float):
    """Eqs. 3 to 6 as printed, with the observation [H; H] and R = diag(I_m, -gamma^2 I_m) (m = 1 in the paper)."""
    m = h.shape[0]
    gain = p @ h.T @ torch.linalg.inv(h @ p @ h.T + torch.eye(m))
    stacked = torch.cat([h, h])
    r = torch.block_diag(torch.eye(m), -(gamma**2) * torch.eye(m))
    r_e = r + stacked @ p @ stacked.T
    return w + gain @ e, p - p @ stacked.T @ torch.linalg.inv(r_e) @ stacked @ p


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    spd = a @ a.T / n + 0.5 * torch.eye(n)
    return (spd + spd.T) / 2  # exactly symmetric, as P_0 = eps0 I is


@pytest.mark.parametrize("m", [1, 3])
def test_the_update_is_equations_3_to_6(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    n = 12
    p, w = random_spd(n, m), torch.randn(n, generator=g)
    h, e = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    want_w, want_p = dense_equations(p, w, h, e, GAMMA)
    before = p.clone()
    upper = p.triu() + torch.full_like(p, float("nan")).tril(-1)  # NaN below: the lower half must never be read
    ehf_update(upper, w, h, e, GAMMA, block=5)  # blocks of 5: uneven, 3 block rows
    got = full_matrix(upper)
    torch.testing.assert_close(w, want_w, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, want_p, atol=1e-12, rtol=1e-10)
    # eq. 7: the information form adds (1 - gamma^-2) H^T H
    torch.testing.assert_close(
        torch.linalg.inv(got), torch.linalg.inv(before) + (1 - GAMMA**-2) * h.T @ h, atol=1e-9, rtol=1e-9
    )


def test_the_product_reads_only_the_upper_block_triangle() -> None:
    p = random_spd(11, 3)
    upper = p.triu() + torch.full_like(p, float("nan")).tril(-1)
    x = torch.randn(11, 2)
    for block in (1, 4, 11, 64):
        torch.testing.assert_close(symmetric_matmul(upper, x, block), p @ x, atol=1e-12, rtol=1e-12)


def test_several_outputs_reduce_to_one_output_at_m_1() -> None:
    """The m x m generalisation at m = 1 is the paper's scalar form: K = P H^T / (H P H^T + 1),
    P <- P - c (P H^T)(H P) / (1 + c H P H^T), c = 1 - gamma^-2."""
    g = torch.Generator().manual_seed(7)
    n = 9
    p, w, h, e = random_spd(n, 7), torch.randn(n, generator=g), torch.randn(1, n, generator=g), torch.randn(1)
    u, s, c = p @ h[0], float(h[0] @ p @ h[0]), 1 - GAMMA**-2
    want_w, want_p = w + u * e[0] / (s + 1), p - c * torch.outer(u, u) / (1 + c * s)
    ehf_update(p, w, h, e, GAMMA)
    torch.testing.assert_close(w, want_w, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(full_matrix(p), want_p, atol=1e-12, rtol=1e-10)


def test_steepest_descent_is_the_gain_step_at_p0_for_each_network_of_a_batch() -> None:
    g = torch.Generator().manual_seed(5)
    n, eps0, m = 6, 0.3, 2
    w, h, e = torch.randn(3, n, generator=g), torch.randn(3, m, n, generator=g), torch.randn(3, m, generator=g)
    got = w.clone()
    steepest_update(got, h, e, eps0)
    for index in range(3):  # each network alone: the first half of eq. 3 at P = eps0 I
        want, _ = dense_equations(eps0 * torch.eye(n), w[index], h[index], e[index], GAMMA)
        torch.testing.assert_close(got[index], want, atol=1e-12, rtol=1e-10)
    single = torch.zeros(n)
    steepest_update(single, h[0, :1], torch.tensor([0.5]), eps0)  # m = 1: the paper's scalar form
    torch.testing.assert_close(single, eps0 * h[0, 0] * 0.5 / (eps0 * float(h[0, 0] @ h[0, 0]) + 1))


def test_the_steepest_optimizer_never_allocates_p() -> None:
    huge = nn.Parameter(torch.zeros(2_000_000))  # its P would be 29 TiB
    optimizer = HInfinity([huge], eps0=0.5, steepest=True)
    x = torch.zeros(2_000_000)
    x[:2] = 1.0
    squared = optimizer.step(lambda: ((huge * x).sum(), torch.tensor(1.0)))
    assert squared == 1.0 and "riccati" not in optimizer.state_dict()["state"].get(0, {})
    torch.testing.assert_close(huge.detach()[:3], torch.tensor([0.25, 0.25, 0.0]))  # 0.5 * 1 / (0.5 * 2 + 1)


def test_the_optimizer_takes_h_from_the_model_and_updates_its_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 2))
    x, y = torch.tensor([0.3, -0.7]), torch.tensor([1.0, 0.0])
    params = list(model.parameters())
    n = sum(q.numel() for q in params)
    optimizer = HInfinity(params, gamma_f=GAMMA, eps0=0.5)
    names = [k for k, _ in model.named_parameters()]
    jacobian = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)),
        tuple(q.detach() for q in params),
    )
    h = torch.cat([j.reshape(2, -1) for j in jacobian], dim=1)
    w = torch.cat([q.detach().reshape(-1) for q in params])
    want_w, want_p = dense_equations(0.5 * torch.eye(n), w, h, y - model(x).detach(), GAMMA)
    before = float(((y - model(x).detach()) ** 2).sum())
    assert optimizer.step(lambda: (model(x), y)) == pytest.approx(before, rel=1e-12)
    torch.testing.assert_close(torch.cat([q.detach().reshape(-1) for q in params]), want_w, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(full_matrix(optimizer.riccati), want_p, atol=1e-12, rtol=1e-10)
    assert "riccati" in optimizer.state_dict()["state"][0]


def test_a_network_too_large_for_memory_is_refused_before_allocating() -> None:
    huge = nn.Parameter(torch.zeros(2_000_000))  # P: 4e12 values, 29 TiB in float64
    assert riccati_bytes(2_000_000) == 2_000_000**2 * 8
    with pytest.raises(MemoryError, match=r"P for 2,000,000 weights needs 29802\.3 GiB"):
        HInfinity([huge])


@pytest.mark.parametrize(("kwargs", "message"), [({"gamma_f": 1.0}, "gamma_f must be a finite number above 1"),
                                                 ({"eps0": 0.0}, "eps0 .* must be a positive")])  # fmt: skip
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HInfinity([nn.Parameter(torch.zeros(3))], **kwargs)
