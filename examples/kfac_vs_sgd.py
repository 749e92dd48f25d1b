"""K-FAC vs momentum SGD on Fashion-MNIST with a small MLP at a large batch (``python examples/kfac_vs_sgd.py``).

An example of distkfac's preconditioner in a plain training loop of a few lines, without jobs.train's configs,
checkpoints or ranks (``python -m jobs.train`` with ``optim.name = "kfac"`` is the framework's way to train). Both
optimizers start from the same initial weights and see the same batches (same seed). Validation accuracy
on the test split is measured every ``--eval-every`` steps; the table reports the first evaluated step at which
it reached ``--target``, the final and best accuracy, and the wall time per training step (evaluation excluded).

:func:`train_until` is the building block, also used by ``tests/test_end_to_end.py``. Run it from the repository
root with the project installed (``scripts/setup.sh``), or with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from jobs.data import FASHION_MNIST_ROOT, load_mnist_like

OptimizerKind = Literal["sgd", "kfac"]

# Embedded defaults (chosen on 2 CPU cores; see the end-to-end test for the comparison against tuned SGD).
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 2048
DEFAULT_TARGET = 0.86
DEFAULT_EVAL_EVERY = 1
DEFAULT_SEED = 0
HIDDEN = (256, 128)
SGD_MOMENTUM = 0.9
SGD_LR = 0.2  # the fastest to 86% of {0.05, 0.1, 0.2, 0.3} (tests/test_end_to_end.py); 0.4 collapses to 10%
# K-FAC's update is KL-clipped (kl_clip / lr^2 bounds the squared step), so its size hardly depends on lr.
# The clip bounds one step, not what momentum accumulates: with momentum 0.9 the loss spikes early and,
# with more frequent decompositions (inv_update_steps=5), diverges; 0.5 is stable across damping,
# inv_update_steps and seeds.
KFAC_LR = 0.1
KFAC_MOMENTUM = 0.5
KFAC_SETTINGS: dict[str, Any] = {
    "damping": 1e-3,
    "factor_decay": 0.95,
    "factor_update_steps": 1,
    "inv_update_steps": 10,
    "kl_clip": 1e-3,
    "compute_method": "eigen",
    "fisher": "empirical",
}


@dataclass
class Data:
    """Flattened, normalised (train mean/std) inputs and labels; validation = (a subset of) the test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def load_data(root: str | Path | None = None, val_size: int | None = None) -> Data:
    """Fashion-MNIST from ``root`` (default: the Debian package's folder), flattened to 784 features.

    Inputs are normalised with the training set's mean and standard deviation. ``val_size`` keeps the first
    ``val_size`` test images (the test split is class-balanced and shuffled, so a prefix is representative).
    """
    root = FASHION_MNIST_ROOT if root is None else root
    train_x, train_y = load_mnist_like(root, "train", dataset="fashion-mnist")
    val_x, val_y = load_mnist_like(root, "test", dataset="fashion-mnist")
    mean, std = train_x.mean(), train_x.std()
    train_x = ((train_x - mean) / std).flatten(1)
    val_x = ((val_x - mean) / std).flatten(1)
    if val_size is not None:
        val_x, val_y = val_x[:val_size], val_y[:val_size]
    return Data(train_x.contiguous(), train_y, val_x.contiguous(), val_y)


def make_mlp(seed: int = DEFAULT_SEED, hidden: Sequence[int] = HIDDEN, inputs: int = 784) -> nn.Sequential:
    """A ReLU MLP ``inputs - hidden... - 10`` with PyTorch's default initialisation drawn from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000) -> float:
    """Fraction of ``x`` classified as ``y`` (model in eval mode for the call)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        correct += int((model(x[start : start + chunk]).argmax(1) == y[start : start + chunk]).sum())
    model.train(was_training)
    return correct / len(x)


def batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation each epoch, the last incomplete batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n})")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


@dataclass
class TrainResult:
    """What one training run did. ``steps_to_target`` is None when the target was never reached."""

    kind: OptimizerKind
    lr: float
    momentum: float
    target: float
    steps_to_target: int | None
    steps: int
    final_accuracy: float
    best_accuracy: float
    train_seconds: float
    diverged: bool = False  # the training loss became NaN or Inf (the run stopped there)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation accuracy)

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)

    @property
    def label(self) -> str:
        name = "K-FAC + momentum SGD" if self.kind == "kfac" else "momentum SGD"
        return f"{name} (lr {self.lr:g}, momentum {self.momentum:g})"


def train_until(
    model: nn.Module,
    kind: OptimizerKind,
    data: Data,
    *,
    lr: float,
    target: float,
    max_steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    eval_every: int = DEFAULT_EVAL_EVERY,
    stop_at_target: bool = True,
    momentum: float | None = None,
    seed: int = DEFAULT_SEED,
    kfac_settings: dict[str, Any] | None = None,
    log_every: int = 0,
) -> TrainResult:
    """Trains ``model`` in place with momentum SGD, preconditioned by K-FAC when ``kind == "kfac"``.

    Validation accuracy is measured every ``eval_every`` steps and after the last one. With
    ``stop_at_target`` the run ends at the first evaluation that reaches ``target``; otherwise it runs
    ``max_steps`` steps. Batches depend only on ``seed``, so runs with the same seed see the same data.
    ``momentum`` defaults to :data:`SGD_MOMENTUM` or :data:`KFAC_MOMENTUM`. A run whose loss becomes NaN or
    Inf stops with ``diverged=True``. With ``log_every > 0`` it prints the validation accuracy every
    ``log_every`` steps and when the target is first reached.
    """
    if kind not in ("sgd", "kfac"):
        raise ValueError(f"unknown optimizer kind {kind!r}; expected 'sgd' or 'kfac'")
    if momentum is None:
        momentum = KFAC_MOMENTUM if kind == "kfac" else SGD_MOMENTUM
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    precond = None
    if kind == "kfac":
        settings = {**KFAC_SETTINGS, **(kfac_settings or {})}
        precond = KFACPreconditioner(model, lr=lr, **settings)

    result = TrainResult(kind, lr, momentum, target, None, 0, 0.0, 0.0, 0.0)
    model.train()
    index_batches = batches(len(data.train_x), batch_size, seed)
    try:
        for step in range(1, max_steps + 1):
            idx = next(index_batches)
            loss = _step(model, optimizer, precond, data.train_x[idx], data.train_y[idx], result)
            if result.diverged:
                if log_every:
                    print(f"  {result.label:44s} step {step:4d}  loss {loss}: diverged, stopping")
                break
            result.steps = step
            if step % eval_every == 0 or step == max_steps:
                reached = _evaluate(model, data, step, result, loss, log_every, max_steps)
                if reached and stop_at_target:
                    break
    finally:
        if precond is not None:
            precond.remove_hooks()
    return result


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precond: KFACPreconditioner | None,
    x: torch.Tensor,
    y: torch.Tensor,
    result: TrainResult,
) -> float:
    """One optimizer step (timed into ``result``); the batch's loss. A non-finite loss sets ``result.diverged``."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        result.diverged = True
        return loss.item()
    loss.backward()
    if precond is not None:
        precond.step()
    optimizer.step()
    result.train_seconds += time.perf_counter() - start
    return loss.item()


def _evaluate(
    model: nn.Module, data: Data, step: int, result: TrainResult, loss: float, log_every: int, max_steps: int
) -> bool:
    """Validation accuracy after ``step``, into ``result``; whether this evaluation first reached the target."""
    acc = accuracy(model, data.val_x, data.val_y)
    result.history.append((step, acc))
    result.final_accuracy = acc
    result.best_accuracy = max(result.best_accuracy, acc)
    reached = acc >= result.target and result.steps_to_target is None
    if log_every and (reached or step % log_every == 0 or step == max_steps):
        note = f"  <- reached {result.target:.1%}" if reached else ""
        print(f"  {result.label:44s} step {step:4d}  loss {loss:.4f}  val acc {acc:.4f}{note}")
    if reached:
        result.steps_to_target = step
    return reached


def compare(
    data: Data,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target: float = DEFAULT_TARGET,
    eval_every: int = DEFAULT_EVAL_EVERY,
    sgd_lr: float = SGD_LR,
    kfac_lr: float = KFAC_LR,
    seed: int = DEFAULT_SEED,
    log_every: int = 0,
) -> list[TrainResult]:
    """Runs momentum SGD and K-FAC + momentum SGD from the same initial weights for ``epochs`` epochs."""
    steps = epochs * (len(data.train_x) // batch_size)
    init = make_mlp(seed)
    results = []
    runs: tuple[tuple[OptimizerKind, float], ...] = (("sgd", sgd_lr), ("kfac", kfac_lr))
    for kind, lr in runs:
        model = copy.deepcopy(init)
        results.append(
            train_until(
                model,
                kind,
                data,
                lr=lr,
                target=target,
                max_steps=steps,
                batch_size=batch_size,
                eval_every=eval_every,
                stop_at_target=False,
                seed=seed,
                log_every=log_every,
            )
        )
    return results


def format_table(results: Sequence[TrainResult]) -> str:
    """A small text table: steps to target, final and best accuracy, time per step."""
    target = results[0].target
    header = ("optimizer", f"steps to {target:.1%}", "final acc", "best acc", "ms/step", "steps")
    rows = [
        (
            r.label,
            str(r.steps_to_target) if r.steps_to_target else ("diverged" if r.diverged else "not reached"),
            f"{r.final_accuracy:.2%}",
            f"{r.best_accuracy:.2%}",
            f"{1000 * r.seconds_per_step:.1f}",
            str(r.steps),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs per optimizer (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="(%(default)s)")
    parser.add_argument(
        "--target", type=float, default=DEFAULT_TARGET, help="validation accuracy to reach (%(default)s)"
    )
    parser.add_argument("--data-root", type=Path, default=None, help=f"Fashion-MNIST IDX folder ({FASHION_MNIST_ROOT})")
    parser.add_argument(
        "--eval-every", type=int, default=DEFAULT_EVAL_EVERY, help="steps between evaluations (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="(%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = load_data(args.data_root)
    steps_per_epoch = len(data.train_x) // args.batch_size
    print(
        f"Fashion-MNIST: {len(data.train_x)} train / {len(data.val_x)} validation (test split); "
        f"MLP 784-{'-'.join(map(str, HIDDEN))}-10; batch {args.batch_size} ({steps_per_epoch} steps/epoch), "
        f"{args.epochs} epochs, {torch.get_num_threads()} threads"
    )
    print(
        f"momentum SGD: lr {SGD_LR}, momentum {SGD_MOMENTUM}; K-FAC + momentum SGD: lr {KFAC_LR}, "
        f"momentum {KFAC_MOMENTUM}, " + ", ".join(f"{k} {v}" for k, v in KFAC_SETTINGS.items())
    )
    results = compare(
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        target=args.target,
        eval_every=args.eval_every,
        seed=args.seed,
        log_every=0 if args.quiet else steps_per_epoch,
    )
    print()
    print(format_table(results))
    sgd, kfac = results
    if sgd.steps_to_target and kfac.steps_to_target:
        kfac_time = kfac.steps_to_target * kfac.seconds_per_step
        sgd_time = sgd.steps_to_target * sgd.seconds_per_step
        print(
            f"\nK-FAC reached {args.target:.1%} in {kfac.steps_to_target} steps, SGD in {sgd.steps_to_target}: "
            f"{sgd.steps_to_target / kfac.steps_to_target:.1f}x fewer steps; training time to the target "
            f"{kfac_time:.1f} s (K-FAC) vs {sgd_time:.1f} s (SGD)."
        )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
