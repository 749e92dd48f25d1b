"""The training loop: set a run up from its configuration, train, evaluate, log and checkpoint.

Every rank runs :func:`run_training` with the same configuration. Determinism: the model's initial weights come
from ``run.seed``; the data order of each epoch and the augmentation of each step come from generators seeded by
``(seed, epoch[, step])`` (:mod:`jobs.datasets`); everything else that evolves (model, optimizer, K-FAC state,
random states, the epoch's running sums) is in the checkpoint. So a run resumed from a checkpoint computes the same
steps as the uninterrupted run, on the same number of ranks and threads, and ends with the same parameters.

For batch-size scaling studies a run can also stop at a target test accuracy (``run.target_accuracy``), record the
gradient noise scale every ``run.noise_every`` steps (:mod:`jobs.noise_scale`) and evaluate its final accuracy on the
training split (``run.train_eval_examples``); docs/train.md says what each measures.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from jobs import checkpoint as ckpt
from jobs.config import Config, ConfigError, ignored_keys, trajectory_differences
from jobs.datasets import Dataset, ShardedBatches, augment_shard, derive_seed, load_dataset
from jobs.metrics import MetricsWriter, ProgressLine, read_metrics
from jobs.models import build_model
from jobs.noise_scale import NoiseScaleEstimator, measure_noise
from jobs.optim import LRSchedule, build_kfac, build_optimizer, make_lr_schedule, set_lr
from jobs.parallel import Context, all_reduce_sum, average_gradients, barrier, broadcast_buffers

__all__ = ["RunSummary", "TrainingDiverged", "evaluate", "history_fields", "run_training"]


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class RunSummary:
    steps: int  # completed optimizer steps, in all invocations of the run
    total_steps: int
    epochs: float
    test_loss: float | None
    test_accuracy: float | None
    seconds: float  # wall time of this invocation
    out_dir: str
    stopped_early: bool  # run.stop_after_steps ended it before total_steps
    resumed_from: int | None  # the step of the checkpoint this invocation started from
    # On the first run.train_eval_examples training examples, at the end (None when stopped early).
    train_loss: float | None = None
    train_accuracy: float | None = None
    target_accuracy: float | None = None  # run.target_accuracy (None when 0, no target)
    steps_to_target: int | None = None  # the first evaluated step whose test accuracy reached the target
    examples_to_target: int | None = None  # steps_to_target x the global batch
    noise_scale: float | None = None  # the last B_simple (None when not measured or not yet positive)
    reached_target: bool = False
    # Over every evaluation of the test split (a fixed-budget study's measure): the highest accuracy and its step.
    best_test_accuracy: float | None = None
    best_test_step: int | None = None
    # K-FAC with a KL clip: the fraction of logged steps whose update the clip set (None without a clip).
    kl_clipped_fraction: float | None = None

    def line(self) -> str:
        if self.stopped_early:
            return (
                f"stopped after step {self.steps} of {self.total_steps} (run.stop_after_steps); "
                f"continue with --resume; out_dir {self.out_dir}"
            )
        test = (
            f"test accuracy {self.test_accuracy:.4f}, test loss {self.test_loss:.4f}"
            if self.test_accuracy is not None and self.test_loss is not None
            else "not evaluated"
        )
        if self.train_accuracy is not None:
            test += f", train accuracy {self.train_accuracy:.4f}"
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""
        target = ""
        if self.target_accuracy is not None:
            if self.steps_to_target is not None:
                early = ", stopped there" if self.steps < self.total_steps else ""
                target = (
                    f"; target accuracy {self.target_accuracy:g} reached at step {self.steps_to_target} "
                    f"({self.examples_to_target} examples){early}"
                )
            else:
                target = f"; target accuracy {self.target_accuracy:g} not reached"
        return (
            f"done: {self.steps} steps ({self.epochs:g} epochs) in {self.seconds:.1f} s{resumed}; {test}{target}; "
            f"out_dir {self.out_dir}"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    context: Context,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) on ``split`` (examples, labels; default the test split) in eval mode.

    Each rank evaluates an equal part and the sums are reduced, so every rank must call it.
    """
    xs, ys = split if split is not None else (data.test_x, data.test_y)
    was_training = model.training
    model.eval()
    part = torch.tensor_split(torch.arange(len(xs)), context.world_size)[context.rank]
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    for start in range(0, len(part), batch_size):
        idx = part[start : start + batch_size]
        x = data.prepare(xs[idx], context.device)
        y = ys[idx].to(context.device)
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(idx)
    model.train(was_training)
    loss_sum, correct, count = all_reduce_sum(totals, context).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _finite_or_none(value: float | None) -> float | None:
    # NaN (B_simple while the |G|^2 estimate is not positive) would make summary.json invalid JSON.
    return value if value is not None and math.isfinite(value) else None


def history_fields(out_dir: Path) -> dict[str, Any]:
    """What the whole run's records say: the best test accuracy and its step, and the fraction of clipped steps.

    Read from ``metrics.jsonl`` at the end, so a resumed run counts the records of its earlier invocations too.
    """
    records = read_metrics(out_dir)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("test_accuracy") is not None]
    best = max(evals, key=lambda r: (r["test_accuracy"], -r["step"]), default=None)
    clipped = [bool(r["kl_clipped"]) for r in records if r.get("kind") == "step" and "kl_clipped" in r]
    return {
        "best_test_accuracy": best["test_accuracy"] if best is not None else None,
        "best_test_step": best["step"] if best is not None else None,
        "kl_clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
    }


def _kl_fields(precond: KFACPreconditioner | None) -> dict[str, Any]:
    """The step record's KL-clip fields (one host synchronisation, on logged steps only)."""
    scale = precond.kl_scale if precond is not None else None
    return {} if scale is None else {"kl_scale": scale, "kl_clipped": scale < 1.0}


def _log(context: Context, message: str) -> None:
    if context.rank == 0:
        print(message, file=sys.stderr, flush=True)


def _load_data(config: Config, context: Context) -> Dataset:
    # The first rank of each node extracts and decodes into the cache; the others then read the cache.
    if context.local_rank != 0:
        barrier(context)
    data = load_dataset(config.data)
    if context.local_rank == 0:
        barrier(context)
    return data


def _write_config(out_dir: Path, config: Config, derived: dict[str, Any]) -> None:
    payload = {**config.to_dict(), "derived": derived}
    tmp = out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out_dir / "config.json")


def _write_summary(out_dir: Path, summary: RunSummary) -> None:
    """``summary.json``: what the run reports, for programs that started it as a separate process (hpo_worker)."""
    temporary = out_dir / ".summary.json.tmp"
    temporary.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    temporary.replace(out_dir / "summary.json")


def _check_resumable(shared: dict[str, Any], config: Config, context: Context, ref: ckpt.CheckpointRef) -> None:
    if shared["world_size"] != context.world_size:
        raise ConfigError(
            f"checkpoint {ref.name} in {ref.folder} was written by {shared['world_size']} ranks, this run has "
            f"{context.world_size}: resume on {shared['world_size']} ranks (or start a new run.out_dir)"
        )
    differences = trajectory_differences(shared["config"], config)
    if differences:
        raise ConfigError(
            f"cannot resume the run in {config.run.out_dir} with a different configuration: "
            + "; ".join(differences)
            + " (use the run's own config, or start a new run.out_dir)"
        )


class _Checkpointer:
    def __init__(self, out_dir: Path, context: Context, keep: int) -> None:
        self.folder = out_dir / ckpt.CHECKPOINT_DIR
        self.context = context
        self.keep = keep

    def save(
        self,
        step: int,
        epoch: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precond: KFACPreconditioner | None,
        epoch_totals: torch.Tensor,
        config: Config,
        steps_to_target: int | None,
        noise: NoiseScaleEstimator | None,
    ) -> None:
        name = ckpt.checkpoint_name(step)
        rank = self.context.rank
        mine = {
            "format": ckpt.FORMAT_VERSION,
            "step": step,
            "rank": rank,
            "world_size": self.context.world_size,
            "kfac": precond.state_dict() if precond is not None else None,
            "rng": ckpt.capture_rng(),
            "epoch_totals": epoch_totals.cpu(),
            # The same on every rank (it averages all-reduced norms); kept per rank like the epoch sums.
            "noise": noise.state_dict() if noise is not None else None,
        }
        ckpt.atomic_torch_save(mine, ckpt.rank_file(self.folder, name, rank))
        if rank == 0:
            shared = {
                "format": ckpt.FORMAT_VERSION,
                "step": step,
                "epoch": epoch,
                "world_size": self.context.world_size,
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                # So that a resumed run that had reached its target still reports it (and, with stop_at_target,
                # stops at once); evaluations are all-reduced, so every rank knows the same step.
                "steps_to_target": steps_to_target,
            }
            ckpt.atomic_torch_save(shared, ckpt.shared_file(self.folder, name))
        barrier(self.context)
        if rank == 0:
            ckpt.mark_latest(self.folder, name)
            ckpt.prune_checkpoints(self.folder, self.keep)


def _noise_record(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    context: Context,
    precond: KFACPreconditioner | None,
    estimator: NoiseScaleEstimator,
) -> dict[str, float | None]:
    """Measures the noise scale on this step's batch, updates ``estimator``; the fields for the step's record."""
    # The extra passes must not add to the K-FAC factors of the coming step.
    with precond.paused() if precond is not None else contextlib.nullcontext():
        small, b_small, big, b_big = measure_noise(model, x, y, context)
    small_sq, big_sq = torch.stack([small, big]).tolist()  # the measurement's one host synchronisation
    estimator.update(small_sq, b_small, big_sq, b_big)
    return {
        "noise_scale": estimator.b_simple,
        "noise_trace": estimator.trace_sigma,
        "noise_grad_sq": estimator.grad_sq_norm,
    }


def _wrap(model: nn.Module, config: Config, context: Context) -> nn.Module:
    if context.kind == "torch" and config.run.ddp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if context.kind == "horovod":
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model


def _write_rank_record(out_dir: Path, context: Context, batches: ShardedBatches, start_step: int) -> None:
    """``ranks/rank<r>.json``: where this rank ran and which examples of its first global batch it took.

    One small file per rank, so that a job's log of who did what survives the job (and tests can check the shards).
    """
    epoch, step_in_epoch = divmod(start_step, batches.steps_per_epoch)
    record = {
        "rank": context.rank,
        "world_size": context.world_size,
        "local_rank": context.local_rank,
        "distributed": context.kind,
        "launcher": getattr(getattr(context, "environment", None), "launcher", "single"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(context.device),
        "step": start_step,
        "indices": batches.indices(epoch, step_in_epoch).tolist(),
    }
    folder = out_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".rank{context.rank}.json.tmp"
    temporary.write_text(json.dumps(record))
    os.replace(temporary, folder / f"rank{context.rank}.json")


def run_training(config: Config, context: Context, log: Callable[[str], None] | None = None) -> RunSummary:
    """Trains as ``config`` says, on this rank; returns what rank 0 reports."""
    started = time.perf_counter()
    say = log or (lambda message: _log(context, message))
    run = config.run
    out_dir = Path(run.out_dir)
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    latest = ckpt.find_latest(out_dir)
    if latest is not None and not run.resume:
        raise ConfigError(
            f"{out_dir} already holds a run (checkpoint {latest.name}): pass --resume (run.resume=true) to continue "
            "it, or choose another run.out_dir"
        )
    if run.resume and latest is None:
        say(f"no checkpoint in {out_dir}: starting from step 0")
    for key in ignored_keys(config):
        say(f"note: {key} is ignored")

    data = _load_data(config, context)
    batches = ShardedBatches(len(data.train_x), config.data.batch_size, context.rank, context.world_size, run.seed)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = run.steps or run.epochs * steps_per_epoch
    if run.noise_every and batches.local_batch < 2:
        raise ConfigError(
            f"run.noise_every needs at least 2 examples per rank (it splits each rank's batch in two halves); the "
            f"local batch is data.batch_size / ranks = {config.data.batch_size} / {context.world_size} = "
            f"{batches.local_batch}: raise data.batch_size or set run.noise_every = 0"
        )
    schedule: LRSchedule = make_lr_schedule(config.optim, steps_per_epoch, total_steps, config.data.batch_size)

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = build_model(config.model, data.input_shape, data.classes).to(context.device)
    shared: dict[str, Any] | None = None
    mine: dict[str, Any] | None = None
    if latest is not None:
        shared, mine = ckpt.load_checkpoint(latest, context.rank, context.device)
        _check_resumable(shared, config, context, latest)
        model.load_state_dict(shared["model"])
    start_step = shared["step"] if shared is not None else 0

    train_model = _wrap(model, config, context)
    optimizer = build_optimizer(config.optim, train_model.parameters(), schedule(min(start_step, total_steps - 1)))
    precond = build_kfac(config.kfac, train_model, schedule) if config.optim.name == "kfac" else None
    epoch_totals = torch.zeros(3, dtype=torch.float64, device=context.device)  # loss sum, correct, examples
    target = run.target_accuracy or None
    steps_to_target: int | None = None
    noise = NoiseScaleEstimator() if run.noise_every else None
    if shared is not None and mine is not None:
        optimizer.load_state_dict(shared["optimizer"])
        if precond is not None:
            precond.load_state_dict(mine["kfac"])
        ckpt.restore_rng(mine["rng"])
        epoch_totals.copy_(mine["epoch_totals"])
        steps_to_target = shared.get("steps_to_target")
        if noise is not None and mine.get("noise") is not None:
            noise.load_state_dict(mine["noise"])

    is_main = context.rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        derived = {
            "world_size": context.world_size,
            "distributed": context.kind,
            "device": str(context.device),
            "local_batch_size": batches.local_batch,
            "train_examples": len(data.train_x),
            "test_examples": len(data.test_x),
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "peak_lr": schedule.peak,
            "schedule": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(schedule).items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "kfac_layers": precond.layer_names if precond is not None else [],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
        _write_config(out_dir, config, derived)
    metrics = MetricsWriter(
        out_dir, enabled=is_main, tensorboard=run.tensorboard, resume_step=start_step if shared is not None else None
    )
    progress = ProgressLine(total_steps, start=start_step, enabled=is_main and run.progress)
    checkpointer = _Checkpointer(out_dir, context, run.keep_checkpoints)
    say(
        f"{config.model.name} on {config.data.name} ({len(data.train_x)} train / {len(data.test_x)} test), "
        f"{config.optim.name}, batch {config.data.batch_size} on {context.world_size} rank(s), "
        f"{total_steps} steps ({steps_per_epoch}/epoch)"
        + (f", resuming after step {start_step}" if shared is not None else "")
    )

    _write_rank_record(out_dir, context, batches, start_step)
    step = start_step
    test_loss: float | None = None
    test_accuracy: float | None = None
    stopped_early = False
    train_loss: float | None = None
    train_accuracy: float | None = None
    # A resumed run that had stopped at its target is finished: it only reports.
    at_target = run.stop_at_target and steps_to_target is not None
    train_model.train()

    def write_epoch_record(step: int, epoch: int, lr: float) -> None:
        loss_sum, correct, count = all_reduce_sum(epoch_totals.clone(), context).tolist()
        metrics.write(
            {
                "kind": "epoch",
                "step": step,
                "epoch": epoch + 1,
                "loss": loss_sum / count,
                "accuracy": correct / count,
                "lr": lr,
            }
        )
        epoch_totals.zero_()

    try:
        while step < total_steps and not at_target:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            tick = time.perf_counter()
            idx = batches.indices(epoch, step_in_epoch)
            x, y = data.train_x[idx], data.train_y[idx]
            if config.data.augment:
                x = augment_shard(
                    x, batches.shard_slice(), batches.global_batch, derive_seed(run.seed, epoch, step_in_epoch, 2)
                )
            x, y = data.prepare(x, context.device), y.to(context.device)
            noise_fields: dict[str, float | None] = {}
            if noise is not None and (step + 1) % run.noise_every == 0:
                # Before the training pass, on the unwrapped model: no gradient sync, .grad untouched.
                noise_fields = _noise_record(model, x, y, context, precond, noise)
            lr = schedule(step)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            logits = train_model(x)
            loss = F.cross_entropy(logits, y)
            if precond is not None and precond.fisher == "mc":
                precond.mc_backward(logits)
            loss.backward()
            if precond is not None:
                try:
                    precond.step()
                except FloatingPointError as exc:  # NaN/Inf factors: the run diverged, as a NaN loss says
                    raise TrainingDiverged(f"{exc} (step {step + 1}, lr {lr:g})") from exc
            elif not isinstance(train_model, nn.parallel.DistributedDataParallel):
                average_gradients(train_model.parameters(), context)
            optimizer.step()
            with torch.no_grad():
                hits = (logits.argmax(1) == y).sum().double()
                batch_totals = torch.stack([loss.detach().double() * len(y), hits, torch.full_like(hits, len(y))])
                epoch_totals += batch_totals
            step += 1

            if step % run.log_every == 0 or step == total_steps or noise_fields:
                loss_sum, correct, count = all_reduce_sum(batch_totals, context).tolist()
                if not torch.isfinite(torch.tensor(loss_sum)):
                    raise TrainingDiverged(
                        f"the training loss is {loss_sum / count} at step {step} (lr {lr:g}): lower optim.lr, or "
                        "add warmup (optim.warmup_epochs)"
                    )
                seconds = time.perf_counter() - tick
                metrics.write(
                    {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": loss_sum / count,
                        "accuracy": correct / count,
                        "lr": lr,
                        "seconds": seconds,
                        "examples_per_second": count / max(seconds, 1e-9),
                        **noise_fields,
                        **_kl_fields(precond),
                    }
                )
                progress.update(step, f"epoch {epoch + 1} loss {loss_sum / count:.4f} lr {lr:.4g}")

            epoch_done = step % steps_per_epoch == 0
            if epoch_done or step == total_steps:
                write_epoch_record(step, epoch, lr)
            eval_now = (epoch_done and run.eval_every and (epoch + 1) % run.eval_every == 0) or (
                run.eval_every_steps and step % run.eval_every_steps == 0
            )
            if eval_now or step == total_steps:
                eval_start = time.perf_counter()
                broadcast_buffers(model, context)
                test_loss, test_accuracy = evaluate(model, data, config.data.eval_batch_size, context)
                metrics.write(
                    {
                        "kind": "eval",
                        "step": step,
                        "epoch": epoch + 1,
                        "test_loss": test_loss,
                        "test_accuracy": test_accuracy,
                        "seconds": time.perf_counter() - eval_start,
                    }
                )
                progress.update(step, f"epoch {epoch + 1} test acc {test_accuracy:.4f}", force=True)
                if target is not None and steps_to_target is None and test_accuracy >= target:
                    steps_to_target = step
                    at_target = run.stop_at_target
                    if at_target and not (epoch_done or step == total_steps):
                        write_epoch_record(step, epoch, lr)  # the partial epoch, as at the end of a run
            if at_target or step == total_steps or (run.checkpoint_every and step % run.checkpoint_every == 0):
                checkpointer.save(
                    step,
                    epoch + int(epoch_done),
                    model,
                    optimizer,
                    precond,
                    epoch_totals,
                    config,
                    steps_to_target,
                    noise,
                )
            if run.stop_after_steps and step >= run.stop_after_steps and step < total_steps and not at_target:
                stopped_early = True
                break
        if not stopped_early:
            broadcast_buffers(model, context)
            if test_accuracy is None:  # resumed a finished run: report its final accuracy
                test_loss, test_accuracy = evaluate(model, data, config.data.eval_batch_size, context)
            first = run.train_eval_examples or len(data.train_x)
            train_loss, train_accuracy = evaluate(
                model, data, config.data.eval_batch_size, context, (data.train_x[:first], data.train_y[:first])
            )
    finally:
        progress.close()
        metrics.close()
        if precond is not None:
            precond.remove_hooks()

    summary = RunSummary(
        steps=step,
        total_steps=total_steps,
        epochs=round(step / steps_per_epoch, 3),
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        seconds=time.perf_counter() - started,
        out_dir=str(out_dir),
        stopped_early=stopped_early,
        resumed_from=start_step if shared is not None else None,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        target_accuracy=target,
        steps_to_target=steps_to_target,
        examples_to_target=steps_to_target * config.data.batch_size if steps_to_target is not None else None,
        noise_scale=_finite_or_none(noise.b_simple) if noise is not None else None,
        reached_target=steps_to_target is not None,
        **(history_fields(out_dir) if context.rank == 0 else {}),
    )
    if context.rank == 0:
        _write_summary(out_dir, summary)
    return summary
