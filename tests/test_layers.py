"""The layer helpers beyond Linear and Conv2d, against the dense float64 reference (tests/kfac_reference.py):
Embedding (diagonal A), LayerNorm and BatchNorm (unit-wise 2 x 2 blocks), and a Linear over a sequence with
K-FAC-expand and K-FAC-reduce."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distkfac.layers
from distkfac import KFACPreconditioner
from distkfac.factors import Structure
from distkfac.layers import Conv2dHelper
from tests.kfac_reference import (
    SequenceClassifier,
    conv_rows,
    grad_of,
    normalised,
    rows_factor,
    sequence_layer_stats,
    solve_layer,
    unit_blocks,
    with_ones,
)

pytestmark = pytest.mark.usefixtures("float64_default")

N, T = 10, 7
DAMPING = 1e-2
FORMS = [("eigen", "tikhonov"), ("eigen", "factored"), ("eigen", "factored-pi"), ("inverse", "factored")]
FORMS += [("inverse", "factored-pi")]


def tokens_batch(step: int, vocab: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, vocab, (N, T), generator=gen)
    tokens[:, -2:] = 0  # trailing padding, as in padded sequences
    return tokens, torch.randint(0, 3, (N,), generator=gen)


def sequence_grads(model: SequenceClassifier) -> list[torch.Tensor]:
    """The model's gradients as the helpers' matrices: Embedding transposed, LayerNorm as units x (weight, bias)."""
    g = [grad_of(p) for p in (model.emb.weight, model.ln.weight, model.ln.bias, model.fc.weight, model.fc.bias)]
    h = [grad_of(model.head.weight), grad_of(model.head.bias)]
    return [
        g[0].t(),
        torch.stack([g[1], g[2]], 1),
        torch.cat([g[3], g[4][:, None]], 1),
        torch.cat([h[0], h[1][:, None]], 1),
    ]


def reference_directions(
    stats: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    running: list[tuple[torch.Tensor, ...]],
    form: str,
    kl_clip: float,
    lr: float,
) -> list[torch.Tensor]:
    vs = [solve_layer(grad, factors, DAMPING, form) for (grad, _), factors in zip(stats, running, strict=True)]
    vg = sum(float((v * grad).sum()) for v, (grad, _) in zip(vs, stats, strict=True))
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * vg)))
    return [nu * v for v in vs]


def run_sequence(method: Any, form: Any, weight_sharing: Any, steps: int = 4, **options: Any) -> None:
    """distkfac's gradients equal the reference's at every step (decay 0.9, decompositions every 2 steps)."""
    torch.manual_seed(0)
    model = SequenceClassifier()
    kfac: dict[str, Any] = {"damping": DAMPING, "factor_decay": 0.9, "inv_update_steps": 2, "kl_clip": 1e-2, "lr": 0.1}
    precond = KFACPreconditioner(
        model, compute_method=method, damping_form=form, weight_sharing=weight_sharing, **kfac, **options
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    running: list[tuple[torch.Tensor, ...]] = []
    snapshot: list[tuple[torch.Tensor, ...]] = []
    for step in range(steps):
        tokens, y = tokens_batch(step)
        stats = sequence_layer_stats(model, tokens, y, weight_sharing)
        new = [factors for _, factors in stats]
        running = (
            new
            if not running
            else [
                tuple(0.9 * r + 0.1 * b for r, b in zip(rs, bs, strict=True))
                for rs, bs in zip(running, new, strict=True)
            ]
        )
        if step % 2 == 0:
            snapshot = [tuple(t.clone() for t in factors) for factors in running]
        expected = reference_directions(stats, snapshot, form, 1e-2, 0.1)
        optimizer.zero_grad()
        F.cross_entropy(model(tokens), y).backward()
        precond.step()
        for name, got, want in zip(precond.layer_names, sequence_grads(model), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11, msg=f"step {step}, {name}")
        optimizer.step()


@pytest.mark.parametrize(("method", "form"), FORMS)
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_embedding_layernorm_and_sequence_linear_match_reference(method: str, form: str, weight_sharing: str) -> None:
    run_sequence(method, form, weight_sharing)


def test_vector_factors_are_kept_as_vectors_and_blocks() -> None:
    model = SequenceClassifier()
    precond = KFACPreconditioner(model)
    tokens, y = tokens_batch(0)
    F.cross_entropy(model(tokens), y).backward()
    precond.step()
    emb, ln = precond._layers[0], precond._layers[1]
    assert emb.helper.a_shape.structure is Structure.DIAGONAL
    assert emb.a_factor is not None and emb.a_factor.shape == (12,)  # the token frequencies, not 12 x 12
    assert ln.a_factor is None and ln.g_factor is not None and ln.g_factor.shape == (6, 2, 2)
    assert precond.layer_names == ["emb", "ln", "fc", "head"]


def test_padding_positions_count_for_nothing() -> None:
    """Padding positions add nothing to the factors but count among the N*T rows: the factors of a padded batch are
    those of the same tokens with the padding cut off, times the fraction kept. The padding row's gradient stays 0."""
    model = SequenceClassifier()
    helper = KFACPreconditioner(model)._layers[0].helper
    tokens, _ = tokens_batch(0)
    tokens[0, 3] = 0  # one padding position inside a sequence as well
    kept = tokens[tokens != 0]
    fraction = kept.numel() / tokens.numel()
    a_padded, a_cut = helper.a_factor(tokens), helper.a_factor(kept[None, :])
    assert a_padded is not None and a_cut is not None
    torch.testing.assert_close(a_padded, fraction * a_cut)
    assert float(a_padded[0]) == 0.0
    grad_output = torch.randn(N, T, 6)
    flat_kept = grad_output[tokens != 0][None]
    # g_scale="example" multiplies by N^2, N being each call's batch size: compare without it.
    batch_helper = type(helper)(model.emb, g_scale="batch")
    torch.testing.assert_close(
        batch_helper.g_factor(grad_output, N, tokens), fraction * batch_helper.g_factor(flat_kept, 1, kept[None])
    )
    precond = KFACPreconditioner(model)
    F.cross_entropy(model(tokens), torch.zeros(N, dtype=torch.long)).backward()
    precond.step()
    assert model.emb.weight.grad is not None and float(model.emb.weight.grad[0].abs().sum()) == 0.0


def test_sparse_embedding_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '0'.*sparse=True.*sparse=False.*skip_layers"):
        KFACPreconditioner(model)
    precond = KFACPreconditioner(model, skip_layers=["0"])  # the fix the message names works
    assert precond.layer_names == ["1"]


def test_reduce_and_expand_agree_without_a_sequence() -> None:
    """On N x d inputs (no positions) the two weight-sharing modes are the same K-FAC."""
    x = torch.randn(N, 5)
    layer = nn.Linear(5, 4)
    expand, reduce = (
        KFACPreconditioner(nn.Sequential(layer), weight_sharing=w)._layers[0].helper for w in ("expand", "reduce")
    )
    torch.testing.assert_close(expand.a_factor(x), reduce.a_factor(x))
    g = torch.randn(N, 4)
    torch.testing.assert_close(expand.g_factor(g, N), reduce.g_factor(g, N))


def test_reduce_factors_are_the_papers_formulas() -> None:
    """K-FAC-reduce: A from the per-example mean input, G from the per-example summed output gradient."""
    layer = nn.Linear(5, 4)
    helper = KFACPreconditioner(nn.Sequential(layer), weight_sharing="reduce")._layers[0].helper
    x, grad_output = torch.randn(N, T, 5), torch.randn(N, T, 4)
    torch.testing.assert_close(helper.a_factor(x), rows_factor(with_ones(x).mean(1)))
    torch.testing.assert_close(helper.g_factor(grad_output, N), rows_factor(N * grad_output.sum(1)))


class NormModel(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv(x))).flatten(1)
        return self.head(torch.relu(self.bn1(self.fc(h))))


def batchnorm_reference(model: NormModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The two BatchNorm layers' unit-wise blocks, from a functional pass with the batch's statistics."""
    s2 = F.conv2d(x, model.conv.weight, model.conv.bias)
    b2 = F.batch_norm(s2, None, None, model.bn2.weight, model.bn2.bias, True, 0.1, model.bn2.eps)
    s1 = F.linear(torch.relu(b2).flatten(1), model.fc.weight, model.fc.bias)
    b1 = F.batch_norm(s1, None, None, model.bn1.weight, model.bn1.bias, True, 0.1, model.bn1.eps)
    for t in (b1, b2):
        t.retain_grad()
    F.cross_entropy(F.linear(torch.relu(b1), model.head.weight, model.head.bias), y, reduction="sum").backward()
    assert b1.grad is not None and b2.grad is not None
    per_unit2 = lambda t: t.reshape(N, 3, -1).transpose(1, 2)  # noqa: E731
    xhat2 = per_unit2(normalised(s2.detach(), (0, 2, 3), model.bn2.eps))
    xhat1 = normalised(s1.detach(), (0,), model.bn1.eps)[:, None, :]
    return [unit_blocks(per_unit2(b2.grad), xhat2), unit_blocks(b1.grad[:, None, :], xhat1)]


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_batchnorm_blocks_and_directions_match_reference(method: Any) -> None:
    torch.manual_seed(1)
    model = NormModel()
    x, y = torch.randn(N, 2, 7, 7), torch.randint(0, 3, (N,))
    blocks = batchnorm_reference(model, x, y)
    model.zero_grad()
    precond = KFACPreconditioner(model, compute_method=method, damping=DAMPING, kl_clip=None)
    assert precond.layer_names == ["conv", "bn2", "fc", "bn1", "head"]
    F.cross_entropy(model(x), y).backward()
    raw = {
        name: torch.stack([grad_of(m.weight).clone(), grad_of(m.bias).clone()], 1)
        for name, m in (("bn2", model.bn2), ("bn1", model.bn1))
    }
    precond.step()
    for (name, module), want in zip((("bn2", model.bn2), ("bn1", model.bn1)), blocks, strict=True):
        layer = precond._layers[precond.layer_names.index(name)]
        torch.testing.assert_close(layer.g_factor, want, rtol=1e-8, atol=1e-11)
        expected = solve_layer(raw[name], (want,), DAMPING, "tikhonov")
        got = torch.stack([grad_of(module.weight), grad_of(module.bias)], 1)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)


def test_layers_that_fit_no_helper_keep_their_gradients() -> None:
    """GroupNorm, a LayerNorm without affine parameters and a grouped convolution are left alone and unlisted."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.LayerNorm(400, elementwise_affine=False),
        nn.Linear(400, 3),
    )
    precond = KFACPreconditioner(model)
    assert precond.layer_names == ["4"]
    x, y = torch.randn(N, 2, 12, 12), torch.randint(0, 3, (N,))
    F.cross_entropy(model(x), y).backward()
    before = {name: grad_of(p).clone() for name, p in model.named_parameters() if not name.startswith("4.")}
    precond.step()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(grad_of(p), before[name]), name


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_checkpoint_resumes_the_new_layers_bit_for_bit(method: Any) -> None:
    def run(
        steps: int, state: dict[str, Any] | None = None, start: int = 0
    ) -> tuple[SequenceClassifier, dict[str, Any]]:
        torch.manual_seed(0)
        model = SequenceClassifier()
        precond = KFACPreconditioner(model, compute_method=method, inv_update_steps=3, weight_sharing="reduce")
        if state is not None:
            model.load_state_dict(state["model"])
            precond.load_state_dict(state["precond"])
        for step in range(start, steps):
            tokens, y = tokens_batch(step)
            model.zero_grad()
            F.cross_entropy(model(tokens), y).backward()
            precond.step()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * grad_of(p))
        return model, {"model": model.state_dict(), "precond": precond.state_dict()}

    straight, _ = run(6)
    _, halfway = run(4)
    resumed, _ = run(6, halfway, start=4)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


OPTIONS: list[dict[str, Any]] = [
    {"fisher": "mc"},
    {"factor_dtype": torch.bfloat16},
    {"compute_method": "inverse", "damping_form": "factored-pi"},
    {"damping_form": "factored", "factor_update_steps": 2, "inv_update_steps": 3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_new_layers_take_every_option(options: dict[str, Any]) -> None:
    """MC Fisher (G from sampled labels), bf16 factors, factored-pi with a layer that has no A, update intervals:
    finite directions that differ from the plain gradient, for Embedding, LayerNorm and BatchNorm alike."""
    torch.manual_seed(0)
    for model, make_input in (
        (SequenceClassifier(), lambda: tokens_batch(0)[0]),
        (NormModel(), lambda: torch.randn(N, 2, 7, 7)),
    ):
        precond = KFACPreconditioner(model, kl_clip=None, **options)
        for _ in range(2):
            model.zero_grad()
            logits = model(make_input())
            if options.get("fisher") == "mc":
                precond.mc_backward(logits)
            F.cross_entropy(logits, torch.randint(0, 3, (N,))).backward()
            plain = [grad_of(p).clone() for p in model.parameters()]
            precond.step()
        after = [grad_of(p) for p in model.parameters()]
        assert all(bool(torch.isfinite(g).all()) for g in after)
        assert all(not torch.equal(a, b) for a, b in zip(plain, after, strict=True))


CONV_SHAPES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(2, 3), dilation=2, padding="same"),
    dict(kernel_size=(2, 4), padding="same"),  # "same" padding one more at the bottom and right than the top and left
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0), padding_mode="circular"),
    dict(kernel_size=1),
    dict(kernel_size=4, stride=3),
]


@pytest.mark.parametrize("options", CONV_SHAPES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_input_factor_from_weight_gradients_is_the_columns_product(
    options: dict[str, Any], dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU's A (oneDNN weight gradients of the input against itself at each kernel offset) equals the im2col
    columns' product for strides, dilations, padding modes and odd kernels, on channels-last inputs too, in one chunk
    of the batch or several, under both conventions; and the columns are the reference's slices."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **options)
    x = torch.randn(5, 3, 9, 8, dtype=dtype)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    reference = conv_rows(F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), conv_unpadded(conv))
    for conv_factors in ("mean", "kfc"):
        helper = Conv2dHelper(conv, conv_factors=conv_factors)
        columns = helper.a_columns(x)
        torch.testing.assert_close(columns[: reference.shape[-1]].t(), reference.reshape(-1, reference.shape[-1]))
        by_columns = helper.a_sum_by_columns(x)
        # Sums of hundreds of products in another order: float32 entries differ by ~1e-7 of the largest.
        atol, rtol = (1e-6 * float(by_columns.abs().max()), 0.0) if dtype == torch.float32 else (None, None)
        torch.testing.assert_close(helper.a_sum_by_weight_grads(x), by_columns, atol=atol, rtol=rtol)
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(helper.a_sum_by_weight_grads(cl), by_columns, atol=atol, rtol=rtol)
        with monkeypatch.context() as patch:  # chunks of 2 examples, the last of 1
            patch.setattr(distkfac.layers, "WEIGHT_GRAD_POSITIONS", 2 * columns.shape[1] // x.shape[0])
            torch.testing.assert_close(helper.a_sum_by_weight_grads(x), by_columns, atol=atol, rtol=rtol)
        count = x.shape[0] if conv_factors == "kfc" else columns.shape[1]
        factor = helper.a_factor(x)
        assert factor.dtype == dtype
        torch.testing.assert_close(factor, by_columns / count, atol=atol and atol / count, rtol=rtol)


def conv_unpadded(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution without padding (the reference pads with zeros only: it is given the padded input)."""
    options = dict(stride=conv.stride, dilation=conv.dilation, bias=conv.bias is not None)
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, **options)  # type: ignore[arg-type]


def test_conv_input_factor_takes_the_columns_below_the_channel_threshold_and_for_1x1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU, a_factor sums by weight gradients from WEIGHT_GRAD_MIN_CHANNELS input channels on, and by the
    columns below (an image's 3 channels: there the columns were faster) and for 1x1 kernels (their columns are the
    input itself)."""
    calls: list[str] = []

    def spy(way: str) -> Any:
        method = getattr(Conv2dHelper, f"a_sum_by_{way}")

        def called(self: Conv2dHelper, x: torch.Tensor) -> torch.Tensor:
            calls.append(way)
            return method(self, x)

        return called

    for way in ("columns", "weight_grads"):
        monkeypatch.setattr(Conv2dHelper, f"a_sum_by_{way}", spy(way))
    threshold = distkfac.layers.WEIGHT_GRAD_MIN_CHANNELS
    for channels, kernel in ((threshold - 1, 3), (threshold, 3), (threshold, 1)):
        helper = Conv2dHelper(nn.Conv2d(channels, 2, kernel, padding=kernel // 2))
        factor = helper.a_factor(torch.randn(2, channels, 5, 5))
        assert factor.shape == (helper.a_dim, helper.a_dim)
    assert calls == ["columns", "weight_grads", "columns"]
