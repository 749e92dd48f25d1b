"""state_dict round trip: a run resumed from a checkpoint continues bit for bit like the uninterrupted run."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner

TOTAL_STEPS = 23
STOP_AT = 14  # neither a factor- nor a decomposition-update step, so restored decompositions are used


def make_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def make_run(method: str, **options: Any) -> tuple[nn.Module, torch.optim.Optimizer, KFACPreconditioner]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(
        model,
        lr=lambda step: 0.05 * 0.97**step,
        compute_method=method,  # type: ignore[arg-type]
        factor_update_steps=3,
        inv_update_steps=5,
        factor_decay=0.9,
        **options,
    )
    return model, optimizer, precond


def train(model: nn.Module, optimizer: torch.optim.Optimizer, precond: KFACPreconditioner, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 5, (32,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        optimizer.step()


# Asynchronous: at STOP_AT the decompositions started at step 10 are in flight; step 15 installs them. Split: the
# first Linear's 65 x 65 A is decomposed as 3 diagonal blocks.
MODES: dict[str, dict[str, Any]] = {
    "synchronous": {},
    "asynchronous": {"async_decompositions": True},
    "split": {"split_factors_above": 24},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_resume_is_bit_identical(method: str, mode: str) -> None:
    model, optimizer, precond = make_run(method, **MODES[mode])
    train(model, optimizer, precond, range(TOTAL_STEPS))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, optimizer, precond = make_run(method, **MODES[mode])
    train(model, optimizer, precond, range(STOP_AT))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "kfac": precond.state_dict()}, buffer)
    del model, optimizer, precond

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    if mode == "asynchronous":
        assert checkpoint["kfac"]["in_flight"]["step"] == 10
    model, optimizer, precond = make_run(method, **MODES[mode])
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["opt"])
    precond.load_state_dict(checkpoint["kfac"])
    assert precond.steps == STOP_AT
    train(model, optimizer, precond, range(STOP_AT, TOTAL_STEPS))

    for resumed, expected in zip(model.parameters(), uninterrupted, strict=True):
        assert torch.equal(resumed, expected)


def test_load_rejects_another_model_or_method() -> None:
    _, _, eigen = make_run("eigen")
    _, _, inverse = make_run("inverse")
    with pytest.raises(ValueError, match="compute_method"):
        inverse.load_state_dict(eigen.state_dict())
    other = KFACPreconditioner(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="layers do not match"):
        other.load_state_dict(eigen.state_dict())
    with pytest.raises(ValueError, match="not a KFACPreconditioner state_dict"):
        eigen.load_state_dict({"model": {}})
