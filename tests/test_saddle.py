"""distkfac.saddle (seed 004): Lemma 1's unit-wise update against autograd's gradient descent step (exact for linear
and ReLU sigma, first order for tanh near the origin), its top eigenvector, the alignment ratio, the plateau-skipping
step, ranks and phases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distkfac.saddle import (
    alignment,
    detect_phases,
    effective_rank,
    skip_plateau,
    top_unit_directions,
    unit_matrices,
    units,
)
from jobs.config import ConfigError, load_config
from jobs.models import build_model

pytestmark = pytest.mark.usefixtures("float64_default")
SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.toml"
ACTIVATIONS = {"linear": lambda z: z, "relu": torch.relu, "tanh": torch.tanh}


def _problem(scale: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    m0, m1, m2, n = 5, 7, 3, 11
    return (scale * torch.randn(m1, m0, generator=g), scale * torch.randn(m2, m1, generator=g),
            torch.randn(m0, n, generator=g), torch.randn(m2, n, generator=g))  # fmt: skip


def _gd_step(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sigma: str, eta: float):
    """One step of full-batch gradient descent on 0.5 |W2 sigma(W1 X) - Y|^2, by autograd; and G = dL/df."""
    a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    f = b @ ACTIVATIONS[sigma](a @ x)
    loss = 0.5 * ((f - y) ** 2).sum()
    ga, gb = torch.autograd.grad(loss, (a, b))
    return w1 - eta * ga, w2 - eta * gb, (f - y).detach()


@pytest.mark.parametrize("sigma", ["linear", "relu"])
def test_lemma_1_is_the_gradient_descent_step_exactly(sigma: str) -> None:
    w1, w2, x, y = _problem(0.3)
    eta = 0.01
    new1, new2, grad = _gd_step(w1, w2, x, y, sigma, eta)
    slopes = None if sigma == "linear" else (w1 @ x > 0).to(x.dtype)  # ReLU's derivative
    m = unit_matrices(x, grad, slopes).expand(len(w1), -1, -1)
    rows = units(w1, w2)
    m0 = w1.shape[1]
    moved = torch.cat([rows[:, :m0] - eta * (m @ rows[:, m0:, None])[..., 0],
                       rows[:, m0:] - eta * (m.transpose(1, 2) @ rows[:, :m0, None])[..., 0]], dim=1)  # fmt: skip
    torch.testing.assert_close(moved, units(new1, new2), atol=1e-13, rtol=1e-11)


def test_lemma_1_holds_to_first_order_for_tanh_near_the_origin() -> None:
    errors = []
    for scale in (1e-2, 1e-3):
        w1, w2, x, y = _problem(scale)
        new1, new2, grad = _gd_step(w1, w2, x, y, "tanh", 0.01)
        m = unit_matrices(x, grad, 1 - torch.tanh(w1 @ x) ** 2)
        rows, m0 = units(w1, w2), w1.shape[1]
        moved = torch.cat([rows[:, :m0] - 0.01 * (m @ rows[:, m0:, None])[..., 0],
                           rows[:, m0:] - 0.01 * (m.transpose(1, 2) @ rows[:, :m0, None])[..., 0]], dim=1)  # fmt: skip
        step = units(new1, new2) - rows
        errors.append(float((moved - units(new1, new2)).norm() / step.norm()))
    assert errors[1] < errors[0] / 50 and errors[1] < 1e-4  # the gap shrinks as scale^2 (tanh z = z - z^3/3)


def test_the_top_direction_is_the_update_matrix_top_eigenvector() -> None:
    w1, w2, x, y = _problem(0.1, seed=3)
    _, _, grad = _gd_step(w1, w2, x, y, "relu", 0.1)
    m = unit_matrices(x, grad, (w1 @ x > 0).to(x.dtype))
    directions, top = top_unit_directions(m)
    eta, m0, m2 = 0.1, x.shape[0], grad.shape[0]
    for i in range(len(m)):
        matrix = torch.eye(m0 + m2)
        matrix[:m0, m0:], matrix[m0:, :m0] = -eta * m[i], -eta * m[i].T
        values, vectors = torch.linalg.eigh(matrix)
        assert float(values[-1]) == pytest.approx(1 + eta * float(top[i]), rel=1e-12)
        assert abs(float(vectors[:, -1] @ directions[i])) == pytest.approx(1.0, rel=1e-10)


def test_skipping_the_plateau_aligns_every_unit_at_its_norm() -> None:
    w1, w2, x, y = _problem(1e-4, seed=5)
    norms = units(w1, w2).norm(dim=1)
    grad = w2 @ w1 @ x - y
    assert float(alignment(units(w1, w2), top_unit_directions(unit_matrices(x, grad))[0]).min()) > 0.5
    skip_plateau(w1, w2, x, grad)
    rows = units(w1, w2)
    torch.testing.assert_close(rows.norm(dim=1), norms, rtol=1e-12, atol=0)
    assert float(alignment(rows, top_unit_directions(unit_matrices(x, grad))[0]).max()) < 1e-10
    assert effective_rank(torch.linalg.svdvals(w2 @ w1), 1e-6) == 1


def test_ranks_and_phases() -> None:
    assert effective_rank(torch.tensor([5.0, 2.0, 0.4, 1e-9]), 0.1) == 2
    assert effective_rank(torch.zeros(3), 0.1) == 0
    curve = [10.0] * 50 + [10.0 * 0.8**k for k in range(1, 11)] + [10.0 * 0.8**10] * 40
    wiggle = [*curve[:20], 9.0, *curve[21:]]  # one step down and back up: too short to be a phase
    for loss in (curve, wiggle):
        phases = detect_phases(loss, tolerance=1e-3, min_length=3)
        assert [(p.kind, p.start, p.stop) for p in phases] == [
            ("plateau", 0, 49),
            ("drop", 49, 59),
            ("plateau", 59, 100),
        ]
    with pytest.raises(ValueError, match="positive tolerance"):
        detect_phases(curve, tolerance=0.0)


def test_the_two_layer_model_at_a_small_initial_scale_follows_lemma_1() -> None:
    overrides = ["model.hidden=[7]", "model.activation=none", "model.bias=false", "model.init_scale=1e-4"]
    model = build_model(load_config(SMOKE, overrides).model, [5], 3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.bias for m in linears] == [None, None] and [tuple(m.weight.shape) for m in linears] == [(7, 5), (3, 7)]
    w1, w2 = (m.weight.detach().clone() for m in linears)
    assert 0.5e-4 < float(torch.cat([w1.flatten(), w2.flatten()]).std()) < 2e-4
    _, _, x, y = _problem(1.0, seed=9)
    loss = 0.5 * ((model(x.T).T - y) ** 2).sum()
    loss.backward()
    grad = (w2 @ w1 @ x - y).detach()
    m = unit_matrices(x, grad)[0]
    torch.testing.assert_close(linears[0].weight.grad, (m @ w2).T, rtol=1e-10, atol=1e-18)  # row i: M w_{i,2}
    torch.testing.assert_close(linears[1].weight.grad, m.T @ w1.T, rtol=1e-10, atol=1e-18)  # column i: M^T w_{i,1}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.init_scale=-1e-4"], "model.init_scale = -0.0001: give a positive standard deviation"),
        (["model.init_scale=nan"], "model.init_scale: nan is not a usable value"),
        (["model.hidden=[8, 8]", "model.residual=true", "model.bias=false"], "model.bias = false is for MLPs without"),
    ],
)
def test_bad_model_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


def _steps_to_fit(scale: float, strength: float | None, steps: int = 4000) -> tuple[int, int]:
    """Full-batch GD (eta 0.05) on a rank-3 linear teacher (singular values 3, 2, 1; X = I) from ``scale`` until
    the loss is below 1e-6; with ``strength``, a skip at step 0 and whenever the loss has stalled for 5 steps
    (a relative fall below 1e-4) while something is left to learn. Returns (steps, skips)."""
    g = torch.Generator().manual_seed(0)
    m0, m1, m2 = 8, 10, 6
    x = torch.eye(m0)
    left, _ = torch.linalg.qr(torch.randn(m2, m2, generator=g))
    right, _ = torch.linalg.qr(torch.randn(m0, m0, generator=g))
    y = (left[:, :3] * torch.tensor([3.0, 2.0, 1.0])) @ right[:, :3].T
    w1 = scale * torch.randn(m1, m0, generator=torch.Generator().manual_seed(1))
    w2 = scale * torch.randn(m2, m1, generator=torch.Generator().manual_seed(2))
    previous, flat, skips, first = float("inf"), 0, 0, None
    for step in range(steps):
        grad = w2 @ w1 @ x - y
        loss = 0.5 * float((grad**2).sum())
        if loss < 1e-6:
            return step, skips
        flat = flat + 1 if (previous - loss) / previous < 1e-4 else 0
        previous = loss
        top = float(torch.linalg.svdvals(x @ grad.T)[0])
        first = first or top
        if strength is not None and (step == 0 or flat == 5) and top > 1e-3 * first:
            skip_plateau(w1, w2, x, grad, strength=strength)
            skips += 1
            grad = w2 @ w1 @ x - y
        w1, w2 = w1 - 0.05 * (w2.T @ grad) @ x.T, w2 - 0.05 * grad @ (w1 @ x).T
    raise AssertionError(f"no fit within {steps} steps")


def test_skipping_plateaus_makes_the_steps_independent_of_the_initial_scale() -> None:
    """Gradient descent's steps grow with log(1/scale) (one plateau per mode); with skips (strength 0.05, our
    variant) they do not, so the advantage grows as the scale shrinks. At the issue's 1e-4 the gain here is about
    1.5 times, not the 3 it asked for: the drops themselves take most of the steps at this learning rate. At 1e-2,
    where there is hardly a plateau, skipping costs a little (179 steps against 160)."""
    plain = [_steps_to_fit(scale, None)[0] for scale in (1e-2, 1e-4, 1e-6)]
    skipped = [_steps_to_fit(scale, 0.05) for scale in (1e-2, 1e-4, 1e-6)]
    assert plain[0] + 50 < plain[1] and plain[1] + 50 < plain[2]
    assert max(s for s, _ in skipped) - min(s for s, _ in skipped) <= 0.1 * min(s for s, _ in skipped)
    assert all(skips == 3 for _, skips in skipped)  # one skip per mode of the rank-3 teacher
    ratios = [p / s for p, (s, _) in zip(plain, skipped, strict=True)]
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 1.8


def test_the_strength_variant_refuses_bad_strengths() -> None:
    w1, w2, x, y = _problem(1e-3)
    grad = w2 @ w1 @ x - y
    for strength in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be positive"):
            skip_plateau(w1, w2, x, grad, strength=strength)
