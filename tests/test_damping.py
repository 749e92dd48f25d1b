"""Adaptive Levenberg-Marquardt damping (distkfac/damping.py, docs/kfac.md "Adaptive damping"): the rule on exact
quadratics, the jvp quadratic model against a dense float64 Fisher, resuming bit for bit, two gloo ranks against one
process, the errors, and a jobs.train run that logs it. About 20 s on 2 CPU cores."""

from __future__ import annotations

import io
import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from distkfac import KFACPreconditioner, LevenbergMarquardt
from distkfac.damping import Adaptation, Likelihood, curvature, measure_and_adapt, predicted_change
from jobs.checkpoint import find_latest, shared_file
from jobs.config import ConfigError, build_config, ignored_keys
from jobs.metrics import read_metrics
from jobs.train import main
from tests import damping_worker
from tests.processes import ENV, PYTHON, ROOT

float64 = pytest.mark.usefixtures("float64_default")  # jobs.train's runs keep torch's float32 default

SMOKE = ROOT / "jobs" / "configs" / "smoke.toml"
KFAC = ("optim.name=kfac", "optim.momentum=0.5", "run.tensorboard=false")
ADAPTIVE = ("kfac.damping_adaptive=true", "kfac.damping_interval=2")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum(1).mean()


def kfac_step(
    model: nn.Module,
    precond: KFACPreconditioner,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    likelihood: Likelihood,
) -> Adaptation | None:
    """One K-FAC step; on the controller's due steps, the measurement and the rule."""
    controller = precond.damping
    assert isinstance(controller, LevenbergMarquardt)
    due = controller.due(precond.steps)
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grad = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    precond.step()
    optimizer.step()
    if not due:
        return None
    return measure_and_adapt(precond, model, x, lambda out: loss_fn(out, y), loss.detach(), before, grad, likelihood)


def linear_problem(n: int = 16) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return model, torch.randn(n, 4), torch.randn(n, 3)


def flat_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, at: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [name for name, _ in model.named_parameters()]
    shapes = [at[name].shape for name in names]
    flat = torch.cat([at[name].reshape(-1) for name in names])

    def h(vector: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(vector, [s.numel() for s in shapes]), strict=True))
        weights = {k: v.reshape(s) for (k, v), s in zip(parts.items(), shapes, strict=True)}
        return squared(functional_call(model, weights, x), y)

    return torch.autograd.functional.hessian(h, flat)


def flat(tensors: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name, _ in model.named_parameters()])


# --------------------------------------------------------------------------- (a) the rule


@float64
def test_exact_quadratic_good_steps_lower_the_damping() -> None:
    """Linear model, squared loss: h is its own quadratic model with F = the Hessian, so rho = actual / (actual +
    1/2 lambda |delta|^2), just above 1 at small lambda: the damping falls by omega1 = (19/20)^T1 each time."""
    model, x, y = linear_problem()
    controller = LevenbergMarquardt(initial=1e-3, interval=2)
    precond = KFACPreconditioner(model, damping=controller, lr=0.2, kl_clip=None, inv_update_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    values = [controller.value]
    for step in range(8):
        theta = {name: p.detach().clone() for name, p in model.named_parameters()}
        with precond.paused():  # the reference's passes must not reach the factors
            grad_theta = torch.autograd.grad(squared(model(x), y), list(model.parameters()))
        damping = controller.value
        result = kfac_step(model, precond, optimizer, x, y, squared, "gaussian")
        assert (result is None) == (step % 2 == 0)
        if result is None:
            continue
        delta = flat({n: p.detach() - theta[n] for n, p in model.named_parameters()}, model)
        g = torch.cat([t.reshape(-1) for t in grad_theta])
        with precond.paused():
            hessian = flat_hessian(model, x, y, theta)
        exact = float(g @ delta + 0.5 * delta @ hessian @ delta)
        assert result.actual == pytest.approx(exact, rel=1e-10)
        assert result.predicted == pytest.approx(exact + 0.5 * damping * float(delta @ delta), rel=1e-10)
        assert result.rho == pytest.approx(result.actual / result.predicted, rel=1e-12) and 1 <= result.rho < 1.01
        values.append(controller.value)
    omega = (19 / 20) ** 2
    assert values == pytest.approx([1e-3 * omega**k for k in range(5)], rel=1e-12)
    assert (controller.updates, controller.decreases, controller.increases) == (4, 4, 0)


@float64
def test_poor_steps_raise_the_damping() -> None:
    """A far too long step: on the exact quadratic the predicted change turns positive (counted as poor); on a tanh
    network the model predicts a decrease and the loss rises (rho < 0). Both raise the damping by 1/omega1."""
    model, x, y = linear_problem()
    controller = LevenbergMarquardt(initial=1e-3, interval=1)
    precond = KFACPreconditioner(model, damping=controller, lr=50.0, kl_clip=None)
    result = kfac_step(model, precond, torch.optim.SGD(model.parameters(), lr=50.0), x, y, squared, "gaussian")
    assert result is not None and result.actual > 0 and result.predicted > 0 and math.isnan(result.rho)
    assert controller.value == pytest.approx(1e-3 / 0.95)

    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    labels = torch.randint(0, 3, (16,))
    controller = LevenbergMarquardt(initial=1e-3, interval=1)
    precond = KFACPreconditioner(network, damping=controller, lr=0.3, kl_clip=None)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.3)
    result = kfac_step(network, precond, optimizer, x, labels, F.cross_entropy, "categorical")
    assert result is not None and result.predicted < 0 < result.actual and result.rho < 0  # the loss rose
    assert controller.value == pytest.approx(1e-3 / 0.95) and controller.increases == 1


def test_the_rule_on_given_changes() -> None:
    lm = LevenbergMarquardt(initial=1e-2, interval=1, minimum=5e-3, maximum=2e-2)
    omega = 19 / 20
    assert lm.update(-1.0, -1.0) == 1.0 and lm.value == 1e-2 * omega  # good: down
    assert lm.update(-0.5, -1.0) == 0.5 and lm.value == 1e-2 * omega  # in between: unchanged
    assert lm.update(0.1, -1.0) == -0.1 and lm.value == pytest.approx(1e-2)  # wrong sign: up
    assert lm.update(-0.01, -1.0) == pytest.approx(0.01) and lm.value == pytest.approx(1e-2 / omega)  # far smaller
    for actual, predicted in 3 * [(-1.0, 0.0), (-1.0, 1.0), (math.nan, -1.0), (-1.0, math.inf), (math.inf, -1.0)]:
        assert math.isnan(lm.update(actual, predicted))  # not a ratio: counted as poor
    assert lm.value == 2e-2  # clamped at the maximum
    for _ in range(30):
        lm.update(-1.0, -1.0)
    assert lm.value == 5e-3 and lm.rho == 1.0  # clamped at the minimum
    assert (lm.updates, lm.decreases, lm.increases) == (49, 31, 17)
    assert [lm.due(step) for step in range(6)] == [True] * 6
    assert [LevenbergMarquardt(interval=3).due(step) for step in range(7)] == [False, False, True] * 2 + [False]
    assert LevenbergMarquardt(initial=0.5)(12345) == 0.5  # a damping hyperparameter: a callable of the step


# --------------------------------------------------------------------------- (b) the quadratic model


def bn_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def dense_fisher(
    model: nn.Module, x: torch.Tensor, at: dict[str, torch.Tensor], likelihood: Likelihood
) -> torch.Tensor:
    """``(1/N) sum_i J_i^T H_i J_i`` from explicit Jacobians (batch-norm couples the examples: J is the full one)."""
    names = [name for name, _ in model.named_parameters()]
    sizes = [at[name].numel() for name in names]

    def outputs(vector: torch.Tensor) -> torch.Tensor:
        weights = {n: v.reshape(at[n].shape) for n, v in zip(names, torch.split(vector, sizes), strict=True)}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return functional_call(model, {**buffers, **weights}, (x,))

    vector = torch.cat([at[name].reshape(-1) for name in names]).detach()
    jacobian = jacrev(outputs)(vector)  # N x C x P
    logits = outputs(vector).detach()
    if likelihood == "gaussian":
        h = torch.eye(logits.shape[1]).expand(len(x), -1, -1)
    else:
        p = torch.softmax(logits, 1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jacobian, h, jacobian) / len(x)


@float64
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_jvp_quadratic_equals_the_dense_fisher(likelihood: Likelihood) -> None:
    model = bn_model()
    model.train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=gen)
    named = dict(model.named_parameters())
    delta = {name: torch.randn(p.shape, generator=gen) for name, p in named.items()}
    grad = {name: torch.randn(p.shape, generator=gen) for name, p in named.items() if name != "3.bias"}
    at = {name: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for name, p in named.items()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for point in (None, at):
        reference = dense_fisher(model, x, point or {n: p.detach() for n, p in named.items()}, likelihood)
        d = flat(delta, model)
        want = float(d @ reference @ d)
        got = curvature(model, x, delta, likelihood, at=point)
        assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-10)
        g = torch.cat([grad.get(n, torch.zeros_like(p)).reshape(-1) for n, p in named.items()])
        model_change = predicted_change(model, x, delta, grad, 0.3, likelihood, at=point)
        assert float(model_change) == pytest.approx(float(g @ d) + 0.5 * (want + 0.3 * float(d @ d)), rel=1e-10)
    assert all(torch.equal(buffers[name], b) for name, b in model.named_buffers())  # running stats and counter kept
    one = {"0.weight": delta["0.weight"]}  # the others move by 0
    d = torch.cat([one.get(n, torch.zeros_like(p)).reshape(-1) for n, p in named.items()])
    reference = dense_fisher(model, x, {n: p.detach() for n, p in named.items()}, likelihood)
    assert float(curvature(model, x, one, likelihood)) == pytest.approx(float(d @ reference @ d), rel=1e-10)


# --------------------------------------------------------------------------- (c) resuming


def resumable_run(steps: int, saved: bytes | None = None) -> tuple[nn.Module, KFACPreconditioner, bytes]:
    """``steps`` K-FAC steps with adaptation every 2, after loading ``saved`` (everything that evolves) if given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    precond = KFACPreconditioner(
        model, damping=LevenbergMarquardt(initial=1e-2, interval=2), lr=0.2, kl_clip=1e-2, inv_update_steps=3
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if saved is not None:
        state = torch.load(io.BytesIO(saved), weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precond.load_state_dict(state["kfac"])
    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)) for _ in range(12)]
    for _ in range(steps):
        x, y = data[precond.steps]
        kfac_step(model, precond, optimizer, x, y, F.cross_entropy, "categorical")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "kfac": precond.state_dict()}, buffer)
    return model, precond, buffer.getvalue()


@float64
def test_state_dict_round_trip_resumes_bit_for_bit() -> None:
    whole_model, whole, _ = resumable_run(9)
    _, first, saved = resumable_run(5)  # stopped in the middle of an interval
    assert first.state_dict()["damping"] == first.damping.state_dict()  # type: ignore[union-attr]
    parts_model, parts, _ = resumable_run(4, saved)
    assert all(torch.equal(a, b) for a, b in zip(whole_model.parameters(), parts_model.parameters(), strict=True))
    assert isinstance(whole.damping, LevenbergMarquardt) and isinstance(parts.damping, LevenbergMarquardt)
    assert whole.damping.state_dict() == parts.damping.state_dict() and whole.damping.updates == 4
    assert whole.damping.value != 1e-2  # it adapted
    assert "LevenbergMarquardt(value=" in repr(parts)
    fixed = KFACPreconditioner(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), damping=1e-2)
    fixed.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False)["kfac"])  # a fixed damping ignores it
    assert fixed.damping == 1e-2 and fixed.state_dict()["damping"] is None


# --------------------------------------------------------------------------- (d) two ranks


@float64
def test_two_gloo_ranks_keep_the_damping_of_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "tests.damping_worker", "--out", str(tmp_path)]
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    torch.set_num_threads(1)
    for config in damping_worker.CONFIGS:
        ranks = [json.loads((tmp_path / f"{config}.rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1], f"{config}: the ranks measured differently"
        single = damping_worker.train(config, 0, 1, "single")
        assert [r["damping"] for r in ranks[0]] == [r["damping"] for r in single]
        for got, want in zip(ranks[0], single, strict=True):
            assert math.isnan(got["rho"]) == math.isnan(want["rho"]), f"{config}: {got} vs {want}"
            for key in ("rho", "actual", "predicted"):
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-13, nan_ok=True), f"{config} {key}"
        values = [r["damping"] for r in single]
        assert values[1] < values[0] < 1e-2 and values[1] < values[2] < values[3]  # down twice, then up twice


# --------------------------------------------------------------------------- (e) errors


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"interval": 0}, r"interval must be an integer >= 1 .* got 0"),
        ({"interval": 2.5}, r"interval must be an integer >= 1"),
        ({"initial": -1.0}, r"initial must be a finite number > 0, got -1.0; give the starting damping"),
        ({"initial": math.nan}, r"initial must be a finite number > 0"),
        ({"minimum": 0.0}, r"minimum must be a finite number > 0"),
        ({"initial": 10.0, "maximum": 1.0}, r"minimum <= initial <= maximum, .* move initial inside the bounds"),
        ({"omega": 1.5}, r"omega must be in \(0, 1\).*leave it None for \(19/20\)\^interval"),
        ({"good": 0.2, "poor": 0.3}, r"0 < poor < good < 1, got poor=0.3, good=0.2"),
    ],
)
def test_bad_settings_name_the_problem(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LevenbergMarquardt(**settings)


@float64
def test_misuse_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"not a LevenbergMarquardt state_dict: missing \['rho', 'updates'"):
        LevenbergMarquardt().load_state_dict({"value": 1.0, "increases": 0, "decreases": 0})
    model, x, y = linear_problem()
    precond = KFACPreconditioner(model, damping=1e-3)
    with pytest.raises(TypeError, match=r"needs KFACPreconditioner\(damping=LevenbergMarquardt"):
        measure_and_adapt(precond, model, x, lambda out: squared(out, y), 0.0, {}, {})
    with pytest.raises(ValueError, match="likelihood must be 'categorical' or 'gaussian'"):
        curvature(model, x, {"weight": torch.zeros(3, 4)}, "poisson")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"delta names no parameter of the model: \['nope'\]"):
        curvature(model, x, {"nope": torch.zeros(3)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"damping_interval": 0}, r"kfac.damping_interval must be > 0, got 0"),
        ({"damping_min": 1.0, "damping_max": 0.1}, r"damping_min = 1.0 is above kfac.damping_max = 0.1"),
        ({"damping_adaptive": True, "damping": 1e-9}, r"kfac.damping = 1e-09 .* must lie in \[kfac.damping_min"),
    ],
)
def test_config_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"optim": {"name": "kfac"}, "kfac": overrides, "run": {"steps": 1}})


def test_adaptive_keys_without_adaptive_damping_are_reported_as_ignored() -> None:
    config = build_config({"optim": {"name": "kfac"}, "kfac": {"damping_interval": 3}, "run": {"steps": 1}})
    assert ignored_keys(config) == ["kfac.damping_interval (kfac.damping_adaptive is false)"]
    adaptive = {"damping_adaptive": True, "damping_interval": 3}
    assert ignored_keys(build_config({"optim": {"name": "kfac"}, "kfac": adaptive, "run": {"steps": 1}})) == []


# --------------------------------------------------------------------------- (f) training runs


def train(out_dir: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["--config", str(SMOKE), f"run.out_dir='{out_dir}'", *KFAC, *ADAPTIVE, *overrides]
    return main([*argv, "--resume"] if resume else argv)


def final_model(out_dir: Path) -> dict[str, torch.Tensor]:
    ref = find_latest(out_dir)
    assert ref is not None
    state: dict[str, torch.Tensor] = torch.load(shared_file(ref.folder, ref.name), weights_only=True)["model"]
    return state


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second")} for r in records]


def test_training_run_logs_the_damping_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    assert train(tmp_path / "whole", "run.log_every=4") == 0
    steps = [r for r in read_metrics(tmp_path / "whole") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(2, 17, 2))  # every adaptation is logged, with log_every = 4
    assert all("damping_rho" in r and r["damping"] > 0 for r in steps)
    values = [r["damping"] for r in steps]
    assert len(set(values)) > 1 and values[0] in (1e-3 * 0.95**2, 1e-3 / 0.95**2, 1e-3)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["kfac"]["damping_adaptive"] is True and config["kfac"]["damping_interval"] == 2
    # Killed after step 7 (checkpoint at step 5, in the middle of an interval), resumed: the same run.
    assert train(tmp_path / "parts", "run.log_every=4", "run.checkpoint_every=5", "run.stop_after_steps=7") == 0
    assert train(tmp_path / "parts", "run.log_every=4", "run.checkpoint_every=5", resume=True) == 0
    whole, parts = final_model(tmp_path / "whole"), final_model(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert without_timing(read_metrics(tmp_path / "parts")) == without_timing(read_metrics(tmp_path / "whole"))
