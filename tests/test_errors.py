"""Bad input and numerical faults give clear errors (or the documented fallback), never silent garbage."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distkfac import DecompositionError, KFACPreconditioner, KFACSettings


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def forward_backward(model: nn.Module, scale: float = 1.0) -> None:
    x, y = torch.randn(16, 4) * scale, torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()


def test_model_without_supported_layer() -> None:
    with pytest.raises(ValueError, match="no layer K-FAC can precondition"):
        KFACPreconditioner(nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4, elementwise_affine=False)))
    with pytest.raises(ValueError, match="no layer K-FAC can precondition"):
        KFACPreconditioner(nn.Sequential(nn.Linear(4, 3)), skip_layers=(nn.Linear,))


def test_step_before_backward() -> None:
    precond = KFACPreconditioner(mlp())
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) before precond.step\(\)"):
        precond.step()


def test_step_after_backward_outside_training_mode() -> None:
    model = mlp()
    precond = KFACPreconditioner(model)
    model.eval()
    forward_backward(model)
    with pytest.raises(RuntimeError, match="training mode"):
        precond.step()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping": -1e-3}, "damping must be a finite number > 0"),
        ({"damping": 0.0}, "damping must be a finite number > 0"),
        ({"factor_decay": 1.0}, r"factor_decay must be in \[0, 1\)"),
        ({"factor_decay": -0.1}, r"factor_decay must be in \[0, 1\)"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"kl_clip": 0.0}, "kl_clip must be a finite number > 0"),
        ({"factor_update_steps": 0}, "factor_update_steps must be an integer >= 1"),
        ({"inv_update_steps": 2.5}, "inv_update_steps must be an integer >= 1"),
        ({"compute_method": "cholesky"}, "compute_method must be one of"),
        ({"fisher": "true"}, "fisher must be 'empirical' or 'mc'"),
        ({"inv_dtype": torch.float16}, "inv_dtype must be torch.float32 or torch.float64"),
        ({"skip_layers": ("fc9",)}, "skip_layers entry 'fc9' names no module"),
    ],
)
def test_bad_hyperparameters(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACPreconditioner(mlp(), **options)


def test_settings_have_one_field_per_keyword_argument() -> None:
    """The constructor hands its keyword arguments to KFACSettings by name: the two lists must stay the same."""
    parameters = inspect.signature(KFACPreconditioner.__init__).parameters.values()
    keywords = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [field.name for field in dataclasses.fields(KFACSettings)] == keywords
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(KFACSettings))


def test_settings_resolve_the_damping_form_and_are_frozen() -> None:
    parameters = inspect.signature(KFACPreconditioner.__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    settings = KFACSettings.checked(**{**defaults, "compute_method": "inverse", "skip_layers": ["fc"]})
    assert settings.damping_form == "factored" and settings.skip_layers == ("fc",)
    assert KFACSettings.checked(**defaults).damping_form == "tikhonov"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"bucket_cap_mb must be a finite number > 0, got 0"):
        KFACSettings.checked(**{**defaults, "bucket_cap_mb": 0})


def test_schedule_checked_when_evaluated() -> None:
    model = mlp()
    precond = KFACPreconditioner(model, damping=lambda step: 1e-3 if step < 1 else -1.0)
    forward_backward(model)
    precond.step()
    model.zero_grad()
    forward_backward(model)
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0, got -1\.0"):
        precond.step()


def test_non_finite_factor_names_the_layer() -> None:
    model = mlp()
    precond = KFACPreconditioner(model)
    forward_backward(model, scale=float("inf"))
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at step 0: 0\.A"):
        precond.step()


def test_non_finite_factor_in_the_background_is_named_at_the_next_decomposition_step() -> None:
    """Asynchronous: the factors of step 2 are checked while they are decomposed, and the verdict is given when the
    result would be installed (step 4), before the training uses anything made from them."""
    model = mlp()
    precond = KFACPreconditioner(model, async_decompositions=True, inv_update_steps=2, factor_decay=0.5)
    for scale in (1.0, 1.0, float("inf"), 1.0):  # steps 0-3
        model.zero_grad()
        forward_backward(model, scale=scale)
        precond.step()
    assert precond.decomposition_staleness == 3  # still the decompositions of step 0
    model.zero_grad()
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at step 2: 0\.A"):
        forward_backward(model)  # step 4's first forward pass installs what step 2 started


def test_eigh_failure_falls_back_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # A LAPACK convergence failure cannot be produced on demand with real data, so eigh is made to fail here.
    real_eigh = torch.linalg.eigh
    seen: list[torch.dtype] = []

    def eigh_fails_in_float32(matrix: torch.Tensor) -> Any:
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return real_eigh(matrix)

    model = mlp()
    precond = KFACPreconditioner(model)
    monkeypatch.setattr(torch.linalg, "eigh", eigh_fails_in_float32)
    forward_backward(model)
    precond.step()
    assert torch.float64 in seen
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_eigh_failure_in_float64_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated as above: eigh fails in every precision.
    def eigh_always_fails(matrix: torch.Tensor) -> Any:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")

    model = mlp()
    precond = KFACPreconditioner(model)
    monkeypatch.setattr(torch.linalg, "eigh", eigh_always_fails)
    forward_backward(model)
    with pytest.raises(DecompositionError, match=r"eigen decomposition failed at step 0 for 0\.A"):
        precond.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factor_storage_stays_close(dtype: torch.dtype) -> None:
    results = []
    for factor_dtype in (None, dtype):
        model = mlp()
        precond = KFACPreconditioner(model, factor_dtype=factor_dtype, damping=1e-2, kl_clip=None)
        for _ in range(3):
            model.zero_grad()
            torch.manual_seed(1)
            forward_backward(model)
            precond.step()
        assert all(layer.a_factor is not None for layer in precond._layers)
        if factor_dtype is not None:
            assert all(layer.a_factor.dtype == dtype for layer in precond._layers)  # type: ignore[union-attr]
        results.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    for full, low in zip(*results, strict=True):
        torch.testing.assert_close(low, full, rtol=0.1, atol=0.05)
