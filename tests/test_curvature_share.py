"""The curvature share of K-FAC's preconditioner (distkfac.diagnostics.curvature_share): its value against the
factors' own eigenvalues, against the step the preconditioner takes, in the damping's limits, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distkfac import KFACPreconditioner, SingleProcessCommunicator
from distkfac.diagnostics.curvature_share import curvature_shares, gathered_shares, overall_share
from distkfac.methods import EigenMethod
from tests.test_layers import NormModel

pytestmark = pytest.mark.usefixtures("float64_default")
N = 16


def decomposed(damping: float = 1e-3, **options: object) -> KFACPreconditioner:
    """A preconditioner on NormModel (dense Conv2d and Linear layers, unit-wise BatchNorm blocks) after one step."""
    torch.manual_seed(2)
    model = NormModel()
    precond = KFACPreconditioner(model, damping=damping, kl_clip=None, **options)  # type: ignore[arg-type]
    F.cross_entropy(model(torch.randn(N, 2, 7, 7)), torch.randint(0, 3, (N,))).backward()
    precond.step()
    return precond


def test_tikhonov_share_is_the_mean_of_curvature_over_curvature_plus_damping() -> None:
    """Written out from the factors' own eigenvalues (eigvalsh of the stored A and G), not from the decompositions."""
    damping = 1e-3
    state = decomposed(damping).state_dict()
    shares = {s.layer: s for s in curvature_shares(state, damping)}
    assert list(shares) == ["conv", "bn2", "fc", "bn1", "head"]
    for name, layer in state["layers"].items():
        d_g = torch.linalg.eigvalsh(layer["G"]).clamp(min=0).reshape(-1)
        curvature = d_g if layer["A"] is None else torch.outer(d_g, torch.linalg.eigvalsh(layer["A"]).clamp(min=0))
        want = (curvature / (curvature + damping)).reshape(-1)
        assert shares[name].directions == want.numel()
        assert shares[name].share == pytest.approx(float(want.mean()), rel=1e-9, abs=1e-12)
        assert shares[name].led == pytest.approx(float((curvature >= damping).double().mean()))
        weighted = float((curvature * curvature / (curvature + damping)).sum() / curvature.sum())
        assert shares[name].energy == pytest.approx(weighted, rel=1e-9)
        assert shares[name].energy > shares[name].share  # the gradient's energy lies where the curvature is large
    weights = {"conv": 3 * 2 * 9 + 3, "bn2": 2 * 3, "fc": 6 * 75 + 6, "bn1": 2 * 6, "head": 3 * 6 + 3}
    assert {name: s.directions for name, s in shares.items()} == weights  # one direction per weight
    pooled = overall_share(list(shares.values()))
    assert pooled.directions == sum(weights.values())
    assert min(s.share for s in shares.values()) < pooled.share < max(s.share for s in shares.values())
    by_weights = sum(s.energy * s.directions for s in shares.values()) / pooled.directions
    assert pooled.energy == pytest.approx(by_weights)  # layers pooled by their weights, not by their curvature


@pytest.mark.parametrize("form", ["tikhonov", "factored", "factored-pi"])
def test_the_share_is_how_much_the_step_falls_short_of_gradient_over_damping(form: str) -> None:
    """A gradient with every eigen-coordinate 1: the preconditioner's step has coordinates 1 / D, and the mean of
    1 - damping / D over them is the layer's share (dense layers, through EigenMethod.precondition itself)."""
    damping = 3e-3
    state = decomposed(damping, damping_form=form).state_dict()
    assert state["conventions"]["damping_form"] == form
    shares = {s.layer: s.share for s in curvature_shares(state, damping)}
    for name in ("conv", "fc", "head"):
        (q_a, d_a), (q_g, d_g) = state["layers"][name]["a_state"], state["layers"][name]["g_state"]
        ones = q_g @ torch.ones(len(d_g), len(d_a)) @ q_a.T
        step = EigenMethod(form).precondition(ones[None], [q_a[None], d_a[None]], [q_g[None], d_g[None]], damping)[0]
        coordinates = q_g.T @ step @ q_a
        assert float((1 - damping * coordinates).mean()) == pytest.approx(shares[name], rel=1e-8, abs=1e-12)


def test_damping_far_above_the_curvature_is_sgd_and_far_below_is_curvature() -> None:
    """Far above, every direction's step is gradient / damping (share 0). Far below, a direction's share is 1 where
    the factors have curvature and 0 in their null space: 16 examples leave most of fc's 76-dim A without any."""
    big, small = 1e6, 1e-12
    above = overall_share(curvature_shares(decomposed(big).state_dict(), big))
    assert above.share < 1e-4 and above.energy < 1e-4 and above.led == 0.0
    below = overall_share(curvature_shares(decomposed(small).state_dict(), small))
    assert 0.2 < below.led < 0.9 and below.share == pytest.approx(below.led, abs=1e-3)
    assert below.energy == pytest.approx(1.0, abs=1e-6)  # the null space holds no gradient energy


def test_the_uncopied_decompositions_and_one_process_gather_give_the_state_dicts_shares() -> None:
    """Two ranks with disjoint layers: tests/test_train.py (mem-opt); here the single-process communicator."""
    precond = decomposed(1e-3)
    want = curvature_shares(precond.state_dict(), 1e-3)
    assert curvature_shares(precond.decompositions(), 1e-3) == want
    names = precond.layer_names
    got = gathered_shares(precond.decompositions(), 1e-3, names, SingleProcessCommunicator(), torch.device("cpu"))
    assert [(s.layer, s.directions) for s in got] == [(s.layer, s.directions) for s in want]
    assert [(s.share, s.led, s.energy) for s in got] == [(s.share, s.led, s.energy) for s in want]


def test_the_adaptive_damping_in_force_is_read_from_the_state() -> None:
    state = decomposed(1e-3).state_dict()
    at_lambda = curvature_shares({**state, "damping": {"value": 10.0}}, 1e-3)
    assert [s.share for s in at_lambda] == [s.share for s in curvature_shares(state, 10.0)]


def test_bad_input_is_refused_by_name() -> None:
    state = decomposed(1e-3).state_dict()
    with pytest.raises(ValueError, match="compute_method is 'inverse': it is defined for compute_method='eigen' only"):
        curvature_shares(decomposed(1e-3, compute_method="inverse").state_dict(), 1e-3)
    with pytest.raises(ValueError, match=r"damping 0\.0 must be positive"):
        curvature_shares(state, 0.0)
    with pytest.raises(ValueError, match="no layer holds a decomposition"):
        overall_share([])
    assert not math.isnan(overall_share(curvature_shares(state, 1e-3)).share)
