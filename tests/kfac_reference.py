"""A dense float64 reference of the K-FAC contract, written independently of distkfac's code paths.

It runs the model functionally (F.linear / F.conv2d, so no module hooks fire), takes per-example output gradients
from a sum-reduced loss, builds im2col rows by explicit slicing, and solves the preconditioning systems as dense
Kronecker products with torch.linalg.solve. Every convention of the contract (damping_form, conv_factors, g_scale)
is written out here from its formula, not taken from distkfac.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def conv_rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col by slicing: (N, T, C*kh*kw) rows in the (C, kh, kw) order of conv.weight.view(out, -1)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        assert conv.padding == "same"
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)
        pads = (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(x, pads)
    n, c, hp, wp = xp.shape
    out_h = (hp - dh * (kh - 1) - 1) // sh + 1
    out_w = (wp - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(patch.reshape(n, c * kh * kw))
    return torch.stack(rows, dim=1)


@dataclass
class LayerStats:
    a: torch.Tensor  # (N, T, a_dim) rows, T = 1 for Linear
    g: torch.Tensor  # (N, T, out) per-example output gradients dl_i/ds
    grad: torch.Tensor  # out x a_dim gradient of the mean loss
    conv: bool = False


def per_example_stats(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, sampled_y: torch.Tensor | None = None
) -> list[LayerStats]:
    """Per-example rows and output gradients of every Linear/Conv2d layer, by a functional forward pass."""
    n = x.shape[0]
    model.zero_grad(set_to_none=True)
    layers: list[tuple[nn.Linear | nn.Conv2d, torch.Tensor, torch.Tensor]] = []
    h = x
    for module in model:
        if isinstance(module, nn.Linear):
            s = F.linear(h, module.weight, module.bias)
        elif isinstance(module, nn.Conv2d):
            s = F.conv2d(h, module.weight, module.bias, module.stride, module.padding, module.dilation)
        else:
            h = F.relu(h) if isinstance(module, nn.ReLU) else module(h)
            continue
        s.retain_grad()
        layers.append((module, h.detach(), s))
        h = s
    # Sum-reduced loss: the gradient at each output is exactly the per-example dl_i/ds_i.
    F.cross_entropy(h, y, reduction="sum").backward(retain_graph=sampled_y is not None)
    grads = []
    for module, _, _ in layers:
        assert isinstance(module, nn.Linear | nn.Conv2d) and module.weight.grad is not None
        cols = [module.weight.grad.reshape(module.weight.shape[0], -1) / n]
        if module.bias is not None:
            assert module.bias.grad is not None
            cols.append(module.bias.grad.reshape(-1, 1) / n)
        grads.append(torch.cat(cols, dim=1))
        module.zero_grad(set_to_none=True)
    g_of = [s.grad for _, _, s in layers]
    if sampled_y is not None:
        for _, _, s in layers:
            s.grad = None
        F.cross_entropy(h, sampled_y, reduction="sum").backward()
        g_of = [s.grad for _, _, s in layers]
        model.zero_grad(set_to_none=True)
    stats = []
    for (module, inp, _), g, grad in zip(layers, g_of, grads, strict=True):
        assert g is not None
        if isinstance(module, nn.Conv2d):
            a = conv_rows(inp, module)
            g_rows = g.detach().flatten(2).transpose(1, 2)
        else:
            a = inp.unsqueeze(1)
            g_rows = g.detach().unsqueeze(1)
        if module.bias is not None:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
        stats.append(LayerStats(a=a, g=g_rows, grad=grad, conv=isinstance(module, nn.Conv2d)))
    return stats


def batch_factors(
    stats: LayerStats, conv_factors: str = "mean", g_scale: str = "example"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_b and G_b as explicit sums over all N*T rows.

    conv_factors="mean": both are means over the N*T rows. "kfc" (conv layers only): A is summed over the T
    positions of each example and averaged over the N examples. g_scale="batch": G is built from the gradient of
    the mean loss, dL/ds = g_i / N, instead of the per-example g_i.
    """
    n, t = stats.a.shape[:2]
    a_sum = sum(torch.outer(stats.a[i, p], stats.a[i, p]) for i in range(n) for p in range(t))
    g_sum = sum(torch.outer(stats.g[i, p], stats.g[i, p]) for i in range(n) for p in range(t))
    assert isinstance(a_sum, torch.Tensor) and isinstance(g_sum, torch.Tensor)
    a_b = a_sum / n if (stats.conv and conv_factors == "kfc") else a_sum / (n * t)
    g_b = g_sum / (n * t)
    if g_scale == "batch":
        g_b = g_b / (n * n)  # (g_i / N)(g_i / N)^T
    return a_b, g_b


def pi_of(a: torch.Tensor, g: torch.Tensor) -> float:
    """Martens & Grosse's pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 when either trace is 0."""
    mean_a, mean_g = float(torch.trace(a)) / a.shape[0], float(torch.trace(g)) / g.shape[0]
    return math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0


def solve(grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, damping: float, form: str) -> torch.Tensor:
    """V from one dense linear system over vec(V) (columns stacked): vec(G V A) = (A^T kron G) vec(V).

    tikhonov: (A^T kron G + damping I) vec(V) = vec(grad). factored / factored-pi:
    ((A + s_A I)^T kron (G + s_G I)) vec(V) = vec(grad), with s_A = s_G = sqrt(damping), or pi sqrt(damping) and
    sqrt(damping) / pi.
    """
    out, cols = grad.shape
    eye_a, eye_g = torch.eye(cols, dtype=grad.dtype), torch.eye(out, dtype=grad.dtype)
    if form == "tikhonov":
        system = torch.kron(a.t().contiguous(), g) + damping * torch.eye(out * cols, dtype=grad.dtype)
    else:
        pi = pi_of(a, g) if form == "factored-pi" else 1.0
        shift = math.sqrt(damping)
        system = torch.kron((a + pi * shift * eye_a).t().contiguous(), g + shift / pi * eye_g)
    vec = torch.linalg.solve(system, grad.t().reshape(-1))
    return vec.reshape(cols, out).t()


def block_diagonal(matrix: torch.Tensor, split_above: int | None) -> torch.Tensor:
    """The matrix with the entries outside its diagonal blocks zeroed: ceil(n / split_above) near-equal blocks,
    the larger ones first (torch.tensor_split's rule), when n > split_above; the matrix itself otherwise."""
    n = matrix.shape[0]
    if split_above is None or n <= split_above:
        return matrix
    chunks = torch.arange(n).tensor_split(-(-n // split_above))
    ids = torch.cat([torch.full((len(chunk),), i) for i, chunk in enumerate(chunks)])
    return matrix * (ids[:, None] == ids[None, :]).to(matrix.dtype)


@dataclass
class ReferenceKFAC:
    damping: float
    factor_decay: float
    factor_update_steps: int
    inv_update_steps: int
    kl_clip: float | None
    lr: float
    compute_method: str
    damping_form: str | None = None  # None: tikhonov for eigen, factored for inverse
    conv_factors: str = "mean"
    g_scale: str = "example"
    split_above: int | None = None  # factors larger than this are replaced by their block diagonal
    lagged: bool = False  # asynchronous: each decomposition step installs the factors of the previous one
    steps: int = 0
    pending: tuple[list[tuple[torch.Tensor, torch.Tensor]], float] | None = None
    factors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    snapshot: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    snapshot_damping: float = 0.0
    last_nu: float = 1.0

    @property
    def form(self) -> str:
        if self.damping_form is not None:
            return self.damping_form
        return "tikhonov" if self.compute_method == "eigen" else "factored"

    def step(self, stats: list[LayerStats]) -> list[torch.Tensor]:
        if self.steps % self.factor_update_steps == 0:
            new = [batch_factors(s, self.conv_factors, self.g_scale) for s in stats]
            if not self.factors:
                self.factors = new
            else:
                d = self.factor_decay
                self.factors = [
                    (d * a + (1 - d) * a_b, d * g + (1 - d) * g_b)
                    for (a, g), (a_b, g_b) in zip(self.factors, new, strict=True)
                ]
        if self.steps % self.inv_update_steps == 0:
            split = self.split_above
            current = [(block_diagonal(a, split).clone(), block_diagonal(g, split).clone()) for a, g in self.factors]
            if self.lagged and self.pending is not None:
                self.snapshot, self.snapshot_damping = self.pending
            else:
                self.snapshot, self.snapshot_damping = current, self.damping
            self.pending = (current, self.damping)
        # eigen damps when it preconditions (every step); inverse bakes the damping into its inverses.
        damping = self.damping if self.compute_method == "eigen" else self.snapshot_damping
        vs = [solve(s.grad, a, g, damping, self.form) for s, (a, g) in zip(stats, self.snapshot, strict=True)]
        if self.kl_clip is not None:
            vg = sum(float((v * s.grad).sum()) for v, s in zip(vs, stats, strict=True))
            self.last_nu = min(1.0, math.sqrt(self.kl_clip / (self.lr**2 * vg)))
            vs = [self.last_nu * v for v in vs]
        self.steps += 1
        return vs


def layer_grads(model: nn.Sequential) -> list[torch.Tensor]:
    """The model's current gradients as out x a_dim matrices."""
    out = []
    for module in model:
        if isinstance(module, nn.Linear | nn.Conv2d):
            assert module.weight.grad is not None
            cols = [module.weight.grad.reshape(module.weight.shape[0], -1)]
            if module.bias is not None:
                assert module.bias.grad is not None
                cols.append(module.bias.grad.reshape(-1, 1))
            out.append(torch.cat(cols, dim=1))
    return out


# ---------------------------------------------------------------- Embedding, normalisation layers, sequences


class SequenceClassifier(nn.Module):
    """Tokens -> Embedding -> LayerNorm -> Linear over the sequence (weight sharing) -> ReLU -> mean -> Linear."""

    def __init__(self, vocab: int = 12, dim: int = 6, hidden: int = 5, classes: int = 3, padding_idx: int = 0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():  # away from LayerNorm's initial (1, 0), so that its blocks are not degenerate
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.ln(self.emb(tokens)))).mean(1))


def normalised(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased variance + eps) over ``dims``, written out."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def unit_blocks(g: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
    """The unit-wise Fisher from per-example ``N x positions x units`` output gradients and normalised inputs:
    ``F_u = (1/N) sum_i v_iu v_iu^T`` with ``v_iu = (sum_p g xhat, sum_p g)``, as an explicit loop."""
    n, _, units = g.shape
    blocks = torch.zeros(units, 2, 2, dtype=g.dtype)
    for i in range(n):
        for u in range(units):
            v = torch.stack([(g[i, :, u] * xhat[i, :, u]).sum(), g[i, :, u].sum()])
            blocks[u] += torch.outer(v, v) / n
    return blocks


def rows_factor(rows: torch.Tensor) -> torch.Tensor:
    """``(1/R) sum_r x_r x_r^T`` over the rows of an ``R x d`` matrix, as an explicit sum."""
    total = sum(torch.outer(r, r) for r in rows)
    assert isinstance(total, torch.Tensor)
    return total / rows.shape[0]


def grad_of(t: torch.Tensor) -> torch.Tensor:
    """``t.grad``, which must be there."""
    assert t.grad is not None
    return t.grad


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


def sequence_layer_stats(
    model: SequenceClassifier, tokens: torch.Tensor, y: torch.Tensor, weight_sharing: str
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """(gradient matrix of the mean loss, its factors) per layer: Kronecker layers give (A, G) with A dense (the
    Embedding's one-hot rows summed as matrices), LayerNorm gives its unit-wise blocks alone."""
    n = tokens.shape[0]
    model.zero_grad(set_to_none=True)
    emb, ln, fc, head = model.emb, model.ln, model.fc, model.head
    e = F.embedding(tokens, emb.weight, emb.padding_idx)
    normed = F.layer_norm(e, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    s = F.linear(normed, fc.weight, fc.bias)
    pooled = torch.relu(s).mean(1)
    out = F.linear(pooled, head.weight, head.bias)
    for t in (e, normed, s, out):
        t.retain_grad()
    F.cross_entropy(out, y, reduction="sum").backward()  # per-example gradients at each output
    # Padding positions are rows of zeros in both factors (no input, no gradient), still counted among the N*T.
    assert emb.padding_idx is not None
    kept = torch.ne(tokens, emb.padding_idx).reshape(-1, 1)
    onehot = torch.eye(emb.num_embeddings, dtype=e.dtype)[tokens.reshape(-1)] * kept
    emb_factors = (rows_factor(onehot), rows_factor(grad_of(e).reshape(-1, e.shape[-1]) * kept))
    xhat = normalised(e.detach(), (2,), ln.eps)
    a = with_ones(normed.detach())
    if weight_sharing == "reduce":
        fc_factors = (rows_factor(a.mean(1)), rows_factor(grad_of(s).sum(1)))
    else:
        fc_factors = (rows_factor(a.reshape(-1, a.shape[-1])), rows_factor(grad_of(s).reshape(-1, s.shape[-1])))
    head_factors = (rows_factor(with_ones(pooled.detach())), rows_factor(grad_of(out)))
    grads = [grad_of(p) / n for p in (emb.weight, ln.weight, ln.bias, fc.weight, fc.bias, head.weight, head.bias)]
    return [
        (grads[0].t(), emb_factors),
        (torch.stack([grads[1], grads[2]], 1), (unit_blocks(grad_of(normed), xhat),)),
        (torch.cat([grads[3], grads[4][:, None]], 1), fc_factors),
        (torch.cat([grads[5], grads[6][:, None]], 1), head_factors),
    ]


def solve_layer(grad: torch.Tensor, factors: tuple[torch.Tensor, ...], damping: float, form: str) -> torch.Tensor:
    """A Kronecker layer's V by ``solve``; unit-wise blocks take the whole damping: ``(F_u + damping I)^-1 grad_u``."""
    if len(factors) == 2:
        return solve(grad, factors[0], factors[1], damping, form)
    blocks = factors[0] + damping * torch.eye(2, dtype=grad.dtype)
    return torch.linalg.solve(blocks, grad.unsqueeze(-1)).squeeze(-1)
