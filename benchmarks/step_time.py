"""Time per training step, side by side: momentum SGD, distkfac's K-FAC and two peers, ASDL's K-FAC and
kfac-pytorch (one process).

Run from the repository root::

    python -m benchmarks.step_time                      # all models, all methods, batch 256
    python -m benchmarks.step_time --models mlp --methods sgd,asdl --threads 1
    python -m benchmarks.step_time --models transformer --batch-sizes 256,2048 --compute-methods eigen,inverse

The peers are benchmark-only dependencies, never imported by the package:

- ASDL (PyPI ``asdfghjkl==0.1a5``, import name ``asdl``) is pinned in requirements-dev.txt, so ``make setup``
  (scripts/setup.sh: ``.venv/bin/python -m pip install -r requirements-dev.txt``) installs it into .venv; by hand:
  ``.venv/bin/pip install asdfghjkl==0.1a5``.
- kfac-pytorch (github gpauloski/kfac-pytorch, import name ``kfac``; measured at commit 869cf11, version 0.4.2) is
  not on PyPI in that version: install its source into the git-ignored ``build/peers``, which this script appends to
  ``sys.path`` (after everything else, so that the ``examples`` folder it also installs cannot shadow ours)::

      git clone https://github.com/gpauloski/kfac-pytorch /tmp/kfac-src   # or, from a bare copy <dir>:
      #   mkdir -p /tmp/kfac-src && git --git-dir=<dir> archive HEAD | tar -x -C /tmp/kfac-src
      git -C /tmp/kfac-src checkout 869cf110334e5a6e9ea054bafdc4558313a821e8   # the measured commit (clone only)
      .venv/bin/pip install --no-deps --target build/peers /tmp/kfac-src

  It imports and runs unpatched on torch 2.13 (CPU): no workaround is applied for it.

Models: ``mlp``, ``mlp6x100``, ``cnn`` (LeNet-5 on CIFAR-10 shapes), ``convnet`` (the CIFAR-10 study's) and
``transformer``, the small ViT of ``jobs.models.VisionTransformer`` on Fashion-MNIST shapes (1x28x28, patch 7: 16
tokens, width 64, depth 2, 4 heads, MLP 128; its 14 Linear layers are applied over the tokens, so every K-FAC factor
sums over 16 positions per example).
``--batch-sizes`` runs every model at each batch size; ``--compute-methods`` keeps the K-FAC methods of those compute
methods (``eigen``: distkfac-eigen, distkfac-eigen-bf16, kfac-pytorch-eigen; ``inverse``: distkfac-inverse,
kfac-pytorch-inverse and ASDL, whose K-FAC inverts damped factors by Cholesky).

Every method trains its own copy of the same freshly initialised model on one fixed random batch (a speed
benchmark: the data do not matter, only the shapes). After a warm-up, the methods are timed in rounds of
``BLOCK_STEPS`` steps each, round-robin and with the order rotated every round, so that drift in the machine's
speed (turbo, other load) hits all methods alike. One block holds exactly one inverse/decomposition update, so
its cost is amortised as in training. The reported time is the median over blocks of the per-step time.

K-FAC settings, the same for all three libraries: damping 1e-3, Kronecker factors updated every step as a running
average that gives the new batch weight 0.05 (distkfac and kfac-pytorch ``factor_decay=0.95``, ASDL
``ema_decay=0.05``), inverses/decompositions refreshed every 10 steps (kfac-pytorch ``inv_update_steps=10``),
empirical Fisher (kfac-pytorch's G comes from the loss's own backward pass, which is the empirical Fisher), KL clip
1e-3 with lr 0.1 for distkfac and kfac-pytorch (ASDL has none). Damping is applied alike: eigen methods divide by
``d_G d_A^T + damping`` in both distkfac and kfac-pytorch (Tikhonov), inverse methods invert ``A + damping I`` and
``G + damping I`` (distkfac's "factored", kfac-pytorch's inverse, ASDL). Each K-FAC step is followed by the same
momentum-SGD step as the SGD baseline (lr: see ``DEFAULT_LR``). After timing, each K-FAC method is checked to really
precondition (its gradient differs from the plain one).

Output per model and batch: the mean ms/step as the median over blocks (each block of 10 steps includes one
decomposition step), the ratio to SGD, and for each peer row ``distkfac / peer``: distkfac's time with the same
compute method (distkfac-eigen for kfac-pytorch-eigen, distkfac-inverse for kfac-pytorch-inverse and ASDL) over the
peer's (below 1: distkfac is faster). Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Inverse/decomposition interval; a timing block has exactly this many steps so that it holds one update.
INV_UPDATE_STEPS = 10
BLOCK_STEPS = INV_UPDATE_STEPS
DAMPING = 1e-3
FACTOR_DECAY = 0.95  # distkfac: F <- 0.95 F + 0.05 F_batch
ASDL_EMA_DECAY = 0.05  # ASDL: F <- (1 - 0.05) F + 0.05 F_batch, the same running average
KL_CLIP = 1e-3
KFAC_LR = 0.1  # distkfac's lr argument (it only enters the KL clip), as specified for this benchmark
MOMENTUM = 0.9
# Learning rate of the momentum-SGD step of every method. The cost of a step does not depend on it, but the
# values must stay finite: at lr 0.1 (and 1e-2, and 1e-3 on mlp6x100) ASDL's K-FAC diverges to NaN within a few
# steps on this fixed batch (it has no KL clip, and its running average of the factors starts from zero, so the
# first inverses are those of 0.05 F), and its Cholesky factorisation then fails. 1e-4 keeps every method finite.
DEFAULT_LR = 1e-4
NUM_CLASSES = 10

MODELS: dict[str, str] = {
    "mlp": "4-layer MLP 784-256-256-256-10, ReLU",
    "mlp6x100": "linear MLP 784-100-100-100-100-100-10 (6 Linear layers, no nonlinearity)",
    "cnn": "LeNet-5, CIFAR-10 shapes (3x32x32)",
    "convnet": "the CIFAR-10 study's ConvNet (jobs.models): 3x3 convs of 16, 32, 32, 32 channels, hidden 128",
    "transformer": "ViT (jobs.models), Fashion-MNIST shapes (1x28x28): patch 7, width 64, depth 2, 4 heads",
}
METHODS: dict[str, str] = {
    "sgd": "SGD (momentum 0.9)",
    "distkfac-eigen": "distkfac K-FAC, eigen",
    "distkfac-inverse": "distkfac K-FAC, inverse",
    "distkfac-eigen-bf16": "distkfac K-FAC, eigen, bf16 factors",
    "asdl": "ASDL K-FAC (KfacGradientMaker)",
    "kfac-pytorch-eigen": "kfac-pytorch K-FAC, eigen",
    "kfac-pytorch-inverse": "kfac-pytorch K-FAC, inverse",
}
# The compute method of each K-FAC method (--compute-methods), and the distkfac method each peer is compared with.
COMPUTE_METHOD: dict[str, str] = {
    "distkfac-eigen": "eigen",
    "distkfac-inverse": "inverse",
    "distkfac-eigen-bf16": "eigen",
    "asdl": "inverse",
    "kfac-pytorch-eigen": "eigen",
    "kfac-pytorch-inverse": "inverse",
}
PEER_OF: dict[str, str] = {
    "asdl": "distkfac-inverse",
    "kfac-pytorch-eigen": "distkfac-eigen",
    "kfac-pytorch-inverse": "distkfac-inverse",
}
PEERS_DIR = Path(__file__).resolve().parents[1] / "build" / "peers"


# ---------------------------------------------------------------------------------------------- models and data


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, NUM_CLASSES),
        )
    if name == "mlp6x100":
        widths = [784, 100, 100, 100, 100, 100, NUM_CLASSES]
        return nn.Sequential(*[nn.Linear(i, o) for i, o in itertools.pairwise(widths)])
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, NUM_CLASSES),
        )
    if name == "convnet":
        from jobs.config import ModelConfig
        from jobs.models import build_model as build_jobs_model

        return build_jobs_model(ModelConfig(name="convnet", channels=[16, 32, 32, 32], hidden=[128]), (3, 32, 32), 10)
    if name == "transformer":
        from jobs.models import VisionTransformer

        return VisionTransformer((1, 28, 28), NUM_CLASSES, width=64, depth=2, heads=4, patch=7, mlp_ratio=2)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_batch(name: str, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed random batch of inputs and labels, the same for every method."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "cnn": (batch_size, 3, 32, 32),
        "convnet": (batch_size, 3, 32, 32),
        "transformer": (batch_size, 1, 28, 28),
    }
    shape = shapes.get(name, (batch_size, 784))
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return x, y


# ------------------------------------------------------------------------------------------------ the methods


class Runner(Protocol):
    key: str
    last_loss: torch.Tensor | None

    def step(self) -> None: ...

    def check(self) -> str:
        """After timing: show that the method did what it claims (raise if it did not)."""
        ...


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _relative_change(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    diff = torch.stack([(a - b).pow(2).sum() for a, b in zip(after, before, strict=True)]).sum().sqrt()
    norm = torch.stack([b.pow(2).sum() for b in before]).sum().sqrt()
    return float(diff / norm)


def _require_preconditioned(key: str, change: float) -> None:
    if not change > 1e-4:
        raise RuntimeError(
            f"{key}: the 'preconditioned' gradient equals the plain gradient (relative change {change:.2e}): "
            "the method fell back to plain SGD"
        )


def _preconditioned_change(runner: Any) -> float:
    """One extra step of a runner with a ``precond`` (distkfac or kfac-pytorch): ``|g_kfac - g| / |g|``, which must
    show that the gradient really was preconditioned."""
    runner.opt.zero_grad()
    F.cross_entropy(runner.model(runner.x), runner.y).backward()
    plain = _grads(runner.model)
    runner.precond.step()
    change = _relative_change(plain, _grads(runner.model))
    _require_preconditioned(runner.key, change)
    return change


class SGDRunner:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        self.key = "sgd"
        self.model, self.x, self.y = model, x, y
        self.opt = _sgd(model, lr)
        self.last_loss: torch.Tensor | None = None

    def step(self) -> None:
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.after_backward()
        self.opt.step()
        self.last_loss = loss.detach()

    def after_backward(self) -> None:
        """Between backward and the optimizer step: nothing for plain SGD."""

    def check(self) -> str:
        return "plain momentum SGD"


class DistKfacRunner(SGDRunner):
    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float,
        compute_method: str,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        from distkfac import KFACPreconditioner

        super().__init__(model, x, y, lr)
        self.key = f"distkfac-{compute_method}" + ("-bf16" if factor_dtype == torch.bfloat16 else "")
        self.precond = KFACPreconditioner(
            model,
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            factor_update_steps=1,
            inv_update_steps=INV_UPDATE_STEPS,
            kl_clip=KL_CLIP,
            lr=KFAC_LR,
            compute_method="eigen" if compute_method == "eigen" else "inverse",
            fisher="empirical",
            factor_dtype=factor_dtype,
            # Like for like: the peers precondition Linear and Conv2d only (ASDL is told to leave LayerNorm alone),
            # so distkfac's unit-wise LayerNorm blocks are left out of the timed work here.
            skip_layers=(nn.LayerNorm,),
        )

    def after_backward(self) -> None:
        self.precond.step()

    def check(self) -> str:
        change = _preconditioned_change(self)
        return (
            f"{len(self.precond.layer_names)} layers preconditioned; "
            f"|g_kfac - g| / |g| = {change:.3g} on one extra step"
        )


def _install_nvtx_stub() -> None:
    """Make ``torch.cuda.nvtx`` ranges no-ops when this torch build has no NVTX (CPU-only builds).

    ASDL wraps its work in NVTX profiler ranges (``with nvtx.range(...)``, and ``@nvtx.range(...)`` decorators
    evaluated when asdl is imported). On a CPU build of torch every range call raises "NVTX functions not
    installed", so ASDL cannot run at all. The ranges are only profiler annotations with no effect on the
    computation, so for this benchmark (and only here) they are replaced with no-ops before asdl is imported.
    """
    nvtx = torch.cuda.nvtx
    try:
        nvtx.range_push("distkfac-benchmark-probe")
        nvtx.range_pop()
        return  # a build with NVTX: leave it alone
    except RuntimeError:
        pass

    @contextlib.contextmanager
    def no_op_range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    def no_op_push(msg: str) -> int:
        return 0

    def no_op_pop() -> int:
        return 0

    stubs: dict[str, Callable[..., Any]] = {"range": no_op_range, "range_push": no_op_push, "range_pop": no_op_pop}
    for name, stub in stubs.items():
        setattr(nvtx, name, stub)


class AsdlRunner:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        _install_nvtx_stub()
        # ASDL registers module backward hooks that torch calls deprecated; the warning is about ASDL, not timing.
        warnings.filterwarnings("ignore", message="Using a non-full backward hook", category=FutureWarning)
        from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig

        self.key = "asdl"
        self.model, self.x, self.y = model, x, y
        self.opt = _sgd(model, lr)
        config = PreconditioningConfig(
            data_size=x.shape[0],  # ASDL sums the loss over the batch and divides by data_size
            damping=DAMPING,
            ema_decay=ASDL_EMA_DECAY,
            curvature_upd_interval=1,
            preconditioner_upd_interval=INV_UPDATE_STEPS,
            # ASDL would also give LayerNorm (transformer) a curvature of its own; distkfac and kfac-pytorch leave
            # it to plain SGD, so ASDL does too here: only Linear and Conv2d layers get Kronecker factors.
            ignore_modules=[nn.LayerNorm],
        )
        self.grad_maker = KfacGradientMaker(model, config, fisher_type=FISHER_EMP)
        self.last_loss: torch.Tensor | None = None

    def step(self) -> None:
        self.opt.zero_grad()
        dummy_logits = self.grad_maker.setup_model_call(self.model, self.x)
        self.grad_maker.setup_loss_call(F.cross_entropy, dummy_logits, self.y)
        _, loss = self.grad_maker.forward_and_backward()
        self.opt.step()
        self.last_loss = loss.detach()

    def check(self) -> str:
        # Every Linear/Conv2d must hold Kronecker factors A, B and their inverses (curvature was computed) ...
        modules = self.grad_maker.modules_for_curvature
        missing = [
            type(m).__name__
            for m in modules
            if getattr(m, "fisher", None) is None or m.fisher.kron is None or not m.fisher.kron.has_inv
        ]
        if not modules or missing:
            raise RuntimeError(f"asdl: no K-FAC curvature/inverse for {missing or 'any module'}")
        # ... and the gradient it hands to SGD must differ from the plain one (no silent fallback to SGD).
        self.opt.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        plain = _grads(self.model)
        self.step_without_optimizer()
        change = _relative_change(plain, _grads(self.model))
        _require_preconditioned(self.key, change)
        return (
            f"{len(modules)} layers with Kronecker factors and inverses; "
            f"|g_kfac - g| / |g| = {change:.3g} on one extra step"
        )

    def step_without_optimizer(self) -> None:
        self.opt.zero_grad()
        dummy_logits = self.grad_maker.setup_model_call(self.model, self.x)
        self.grad_maker.setup_loss_call(F.cross_entropy, dummy_logits, self.y)
        self.grad_maker.forward_and_backward()


class KfacPytorchRunner(SGDRunner):
    """gpauloski/kfac-pytorch's ``kfac.preconditioner.KFACPreconditioner`` (installed in build/peers: see the
    module docstring), the same settings as distkfac's; ``step()`` preconditions the gradients in place."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, compute_method: str) -> None:
        super().__init__(model, x, y, lr)
        self.key = f"kfac-pytorch-{compute_method}"
        preconditioner = _import_kfac_pytorch()
        # kfac-pytorch logs every layer it registers, and its module hooks draw torch's backward-hook warning.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        self.precond = preconditioner(
            model,
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            factor_update_steps=1,
            inv_update_steps=INV_UPDATE_STEPS,
            kl_clip=KL_CLIP,
            lr=KFAC_LR,
            compute_method=compute_method,
        )

    def after_backward(self) -> None:
        self.precond.step()

    def check(self) -> str:
        change = _preconditioned_change(self)
        layers = len(self.precond._layers)  # no public count in kfac-pytorch 0.4.2
        return f"{layers} layers preconditioned; |g_kfac - g| / |g| = {change:.3g} on one extra step"


def _import_kfac_pytorch() -> Any:
    if str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))  # last: its top-level "examples" package must not shadow ours
    # Its import says that NVIDIA Apex is missing and that it falls back to torch's own flatten: the fallback is meant.
    warnings.filterwarnings("ignore", message="NVIDIA Apex is not installed", category=UserWarning)
    try:
        from kfac.preconditioner import KFACPreconditioner
    except ImportError as exc:
        raise SystemExit(
            f"kfac-pytorch is not installed in {PEERS_DIR} ({exc}): copy its source (github gpauloski/kfac-pytorch) to "
            "/tmp/kfac-src and run `.venv/bin/pip install --no-deps --target build/peers /tmp/kfac-src`"
        ) from None
    return KFACPreconditioner


def make_runner(key: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> Runner:
    if key == "sgd":
        return SGDRunner(model, x, y, lr)
    if key == "distkfac-eigen":
        return DistKfacRunner(model, x, y, lr, "eigen")
    if key == "distkfac-inverse":
        return DistKfacRunner(model, x, y, lr, "inverse")
    if key == "distkfac-eigen-bf16":
        return DistKfacRunner(model, x, y, lr, "eigen", factor_dtype=torch.bfloat16)
    if key == "asdl":
        return AsdlRunner(model, x, y, lr)
    if key in ("kfac-pytorch-eigen", "kfac-pytorch-inverse"):
        return KfacPytorchRunner(model, x, y, lr, COMPUTE_METHOD[key])
    raise ValueError(f"unknown method {key!r}; choose from {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------------- timing


def time_interleaved(runners: Sequence[Runner], warmup: int, steps: int) -> dict[str, list[float]]:
    """Per-step times in ms, one entry per block of ``BLOCK_STEPS`` steps, methods interleaved in rounds."""
    for runner in runners:
        for _ in range(warmup):
            runner.step()
    block_ms: dict[str, list[float]] = {runner.key: [] for runner in runners}
    for round_index in range(steps // BLOCK_STEPS):
        shift = round_index % len(runners)
        for runner in [*runners[shift:], *runners[:shift]]:
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                for _ in range(BLOCK_STEPS):
                    runner.step()
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            block_ms[runner.key].append(1e3 * elapsed / BLOCK_STEPS)
    return block_ms


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_model(
    name: str, methods: Sequence[str], batch_size: int, warmup: int, steps: int, seed: int, lr: float
) -> None:
    torch.manual_seed(seed)
    base = build_model(name)
    x, y = make_batch(name, batch_size, seed)
    runners = [make_runner(key, copy.deepcopy(base), x, y, lr) for key in methods]
    block_ms = time_interleaved(runners, warmup, steps)
    median = {key: statistics.median(times) for key, times in block_ms.items()}

    print(f"### {name}: {MODELS[name]}, batch {batch_size}\n")
    print_table(methods, median)
    print_floor(name, batch_size, median)
    for runner in runners:
        times = block_ms[runner.key]
        loss = float(runner.last_loss) if runner.last_loss is not None else float("nan")
        finite = "" if math.isfinite(loss) else " (NOT FINITE: the timing of this method is suspect)"
        print(
            f"- {runner.key}: blocks min/median/max {min(times):.2f}/{median[runner.key]:.2f}/{max(times):.2f} "
            f"ms/step; last loss {loss:.4f}{finite}; {runner.check()}"
        )
    print(flush=True)


def gemm_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 matrix-product rate (GFLOP/s) on 1024 x 1024 products, the best of a few runs."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tick)
    return 2 * 1024**3 / best / 1e9


def mlp_floor_ms(model: nn.Module, batch_size: int, compute_method: str, gflops: float) -> float:
    """The FLOP floor of one K-FAC step on an MLP, in ms: its multiply-adds at ``gflops`` plus the decompositions.

    Per Linear layer (a = in + 1, g = out, N = batch): forward and backward ``3 N a g``, both factors ``N (a^2 + g^2)``
    (every step), preconditioning ``2 a g (a + g)`` per product pair (inverse: one pair; eigen: two, into and out of
    the eigenbasis). The decompositions (``eigh`` or Cholesky inverse of each factor) are timed here, once, and
    counted at one step in ``INV_UPDATE_STEPS``.
    """
    macs, decompose_s = 0.0, 0.0
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        a, g = layer.in_features + 1, layer.out_features
        pairs = 2 if compute_method == "eigen" else 1
        macs += 3 * batch_size * a * g + batch_size * (a * a + g * g) + pairs * a * g * (a + g)
        for n in (a, g):
            root = torch.randn(n, n) / math.sqrt(n)
            spd = root @ root.t() + torch.eye(n)
            tick = time.perf_counter()
            if compute_method == "eigen":
                torch.linalg.eigh(spd)
            else:
                torch.cholesky_inverse(torch.linalg.cholesky(spd))
            decompose_s += time.perf_counter() - tick
    return 1e3 * (2 * macs / (gflops * 1e9) + decompose_s / INV_UPDATE_STEPS)


def print_floor(name: str, batch_size: int, median: dict[str, float]) -> None:
    """For the MLP: each distkfac method's time over its FLOP floor (the issue's target: within 1.3x)."""
    if name != "mlp":
        return
    gflops = gemm_gflops()
    print(f"FLOP floor (`mlp_floor_ms`, float32 GEMM rate measured now: {gflops:.1f} GFLOP/s):\n")
    print("| method | ms/step | floor ms/step | method / floor |")
    print("|---|---:|---:|---:|")
    for key in ("distkfac-eigen", "distkfac-inverse"):
        if key in median:
            floor = mlp_floor_ms(build_model("mlp"), batch_size, COMPUTE_METHOD[key], gflops)
            print(f"| {METHODS[key]} | {median[key]:.2f} | {floor:.2f} | {median[key] / floor:.2f} |")
    print()


def print_table(methods: Sequence[str], median: dict[str, float]) -> None:
    """ms/step, x SGD, and for a peer distkfac's time with the same compute method over the peer's."""
    print("| method | ms/step | x SGD | distkfac / peer |")
    print("|---|---:|---:|---:|")
    for key in methods:
        ratio = f"{median[key] / median['sgd']:.2f}" if "sgd" in median else "n/a"
        ours = PEER_OF.get(key)
        versus = f"{median[ours] / median[key]:.2f} ({ours})" if ours in median else ""
        print(f"| {METHODS[key]} | {median[key]:.2f} | {ratio} | {versus} |")
    print()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--batch-sizes", default="256", help="comma-separated; every model runs at each")
    parser.add_argument(
        "--compute-methods", default="eigen,inverse", help="keep the K-FAC methods of these: eigen, inverse"
    )
    parser.add_argument("--steps", type=int, default=200, help=f"timed steps per method, a multiple of {BLOCK_STEPS}")
    parser.add_argument(
        "--warmup", type=int, default=20, help=f"untimed steps per method first, a multiple of {BLOCK_STEPS}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="lr of the momentum-SGD step of every method (see DEFAULT_LR)"
    )
    args = parser.parse_args(argv)

    def split(value: str, known: dict[str, str], what: str) -> list[str]:
        items = [item.strip() for item in value.split(",") if item.strip()]
        unknown = [item for item in items if item not in known]
        if unknown or not items:
            parser.error(f"--{what}: unknown or empty {unknown}; choose from {', '.join(known)}")
        return list(dict.fromkeys(items))

    args.models = split(args.models, MODELS, "models")
    computes = split(args.compute_methods, {"eigen": "", "inverse": ""}, "compute-methods")
    args.methods = [
        m for m in split(args.methods, METHODS, "methods") if COMPUTE_METHOD.get(m, computes[0]) in computes
    ]
    if not args.methods:
        parser.error(f"no method of --methods has a compute method in --compute-methods {computes}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}")
    if args.steps < BLOCK_STEPS or args.steps % BLOCK_STEPS:
        parser.error(f"--steps must be a positive multiple of {BLOCK_STEPS}, got {args.steps}")
    if args.warmup < 0 or args.warmup % BLOCK_STEPS:
        parser.error(f"--warmup must be a multiple of {BLOCK_STEPS}, got {args.warmup}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be sizes >= 1, got {args.batch_sizes}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = " ".join(["python -m benchmarks.step_time", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    print("## Step time: SGD vs distkfac vs ASDL vs kfac-pytorch (single process, CPU)\n")
    print(f"- command: `{command}`")
    print(f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores")
    # Other processes on the machine distort CPU timings badly (OpenMP threads then wait for cores): show it.
    print("- load average (1, 5, 15 min) at start: " + ", ".join(f"{load:.2f}" for load in os.getloadavg()))
    print(f"- Python {platform.python_version()}, {platform.system()} {platform.machine()}")
    print(
        f"- batch {', '.join(map(str, args.batch_sizes))}, warm-up {args.warmup} steps, then {args.steps} timed "
        f"steps per method in interleaved blocks of {BLOCK_STEPS}; ms/step = median over blocks"
    )
    print(
        f"- K-FAC: damping {DAMPING}, factors every step (new-batch weight {ASDL_EMA_DECAY}), inverses every "
        f"{INV_UPDATE_STEPS} steps, empirical Fisher, distkfac kl_clip {KL_CLIP} with lr {KFAC_LR}; "
        f"kfac-pytorch the same as distkfac; every method ends with momentum SGD (lr {args.lr}, momentum {MOMENTUM})\n",
        flush=True,
    )
    for name in args.models:
        for batch_size in args.batch_sizes:
            run_model(name, args.methods, batch_size, args.warmup, args.steps, args.seed, args.lr)


if __name__ == "__main__":
    main()
