"""The training loop: set a run up from its configuration, train, evaluate, log and checkpoint.

Every rank runs :func:`run_training` with the same configuration. Determinism: the model's initial weights come
from ``run.seed``; the data order of each epoch and the augmentation of each step come from generators seeded by
``(seed, epoch[, step])`` (:mod:`jobs.datasets`); everything else that evolves (model, optimizer, K-FAC state,
random states, the epoch's running sums) is in the checkpoint. So a run resumed from a checkpoint computes the same
steps as the uninterrupted run, on the same number of ranks and threads, and ends with the same parameters.

For batch-size scaling studies a run can also stop at a target test accuracy (``run.target_accuracy``), record the
gradient noise scale every ``run.noise_every`` steps (:mod:`jobs.noise_scale`) and evaluate its final accuracy on the
training split (``run.train_eval_examples``); docs/train.md says what each measures.

:class:`TrainingRun` is one invocation of a run on one rank, in steps: start or resume, train a step, log it,
evaluate, checkpoint, finish. :func:`run_training` drives it and makes rank 0 report how the run ended in
``summary.json`` (:mod:`jobs.outcome`): finished, stopped, diverged or failed.
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
from torch import nn

from distkfac import KFACPreconditioner, LevenbergMarquardt
from distkfac.comm import average_gradients, barrier, broadcast_from
from distkfac.damping import Likelihood, measure_and_adapt
from distkfac.diagnostics.curvature_share import gathered_shares, overall_share
from distkfac.saddle_optim import PlateauSkippingGD
from jobs import checkpoint as ckpt
from jobs.config import Config, ConfigError, ignored_keys, trajectory_differences
from jobs.datasets import Dataset, ShardedBatches, augment_shard, derive_seed, load_dataset
from jobs.diagnostics import check_fisher_layer, fisher_due, fisher_record, save_fisher_values
from jobs.dynamics import dynamics_due, dynamics_record, phases_record
from jobs.files import atomic_write_text
from jobs.metrics import MetricsWriter, ProgressLine, read_metrics
from jobs.models import build_model
from jobs.noise_scale import NoiseScaleEstimator, measure_noise
from jobs.objective import batch_loss, hits
from jobs.optim import build_kfac, build_optimizer, make_lr_schedule, set_lr
from jobs.outcome import PRUNE_REQUEST, SUMMARY_JSON, RunEnd
from jobs.parallel import Context
from jobs.passes import backward_in_passes, pass_examples

__all__ = ["RunSummary", "TrainingDiverged", "TrainingRun", "evaluate", "history_fields", "run_training"]

Say = Callable[[str], None]


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
    # K-FAC (eigen): the curvature share of its preconditioner at the last evaluation (distkfac.diagnostics.
    # curvature_share: 0 = the step is the gradient / damping, towards 1 = curvature sets it), over all weights,
    # and weighted by the gradient's expected energy.
    curvature_share: float | None = None
    curvature_energy: float | None = None
    # How the run ended (jobs.outcome.RunEnd's value) and, unless it finished or stopped, why.
    end: str = RunEnd.FINISHED.value
    reason: str | None = None

    def line(self) -> str:
        if self.end == RunEnd.PRUNED:
            return f"pruned after step {self.steps} of {self.total_steps} ({self.reason}); out_dir {self.out_dir}"
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
    loss: str = "cross_entropy",
) -> tuple[float, float | None]:
    """(mean loss ``loss``, accuracy) on ``split`` (examples, labels; default the test split) in eval mode; the
    accuracy is None for a regression.

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
        totals[0] += batch_loss(logits, y, loss, reduction="sum").double()
        totals[1] += hits(logits, y)
        totals[2] += len(idx)
    model.train(was_training)
    context.comm.allreduce_sum(totals, "evaluation").wait()
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), None if data.regression else correct / max(count, 1)


def _finite_or_none(value: float | None) -> float | None:
    # NaN (B_simple while the |G|^2 estimate is not positive) would make summary.json invalid JSON.
    return value if value is not None and math.isfinite(value) else None


def history_fields(out_dir: Path) -> dict[str, Any]:
    """What the whole run's records say: the best test accuracy and its step, the fraction of clipped steps, and
    the last evaluation's curvature share.

    Read from ``metrics.jsonl`` at the end, so a resumed run counts the records of its earlier invocations too.
    """
    records = read_metrics(out_dir)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("test_accuracy") is not None]
    best = max(evals, key=lambda r: (r["test_accuracy"], -r["step"]), default=None)
    clipped = [bool(r["kl_clipped"]) for r in records if r.get("kind") == "step" and "kl_clipped" in r]
    shares = [r for r in evals if r.get("curvature_share") is not None]
    return {
        "best_test_accuracy": best["test_accuracy"] if best is not None else None,
        "best_test_step": best["step"] if best is not None else None,
        "kl_clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
        "curvature_share": shares[-1]["curvature_share"] if shares else None,
        "curvature_energy": shares[-1].get("curvature_energy") if shares else None,
    }


def _kl_fields(precond: KFACPreconditioner | None) -> dict[str, Any]:
    """The step record's KL-clip fields (one host synchronisation, on logged steps only), and how many steps old the
    factors behind the step's decompositions were."""
    if precond is None:
        return {}
    scale = precond.kl_scale
    fields = {} if scale is None else {"kl_scale": scale, "kl_clipped": scale < 1.0}
    return {**fields, "kfac_staleness": precond.decomposition_staleness}


def _curvature_fields(precond: KFACPreconditioner | None, damping: float, context: Context) -> dict[str, Any]:
    """The eval record's curvature share of K-FAC's eigen preconditioner (collective), pooled over the weights and by
    layer: how far its step is from the gradient divided by the damping (distkfac.diagnostics.curvature_share)."""
    if precond is None or precond.compute_method != "eigen":
        return {}
    shares = gathered_shares(precond.decompositions(), damping, precond.layer_names, context.comm, context.device)
    if not shares:  # nothing decomposed yet
        return {}
    pooled = overall_share(shares)
    by_layer = {share.layer: {"share": share.share, "energy": share.energy} for share in shares}
    return {
        "curvature_share": pooled.share, "curvature_led": pooled.led, "curvature_energy": pooled.energy,
        "curvature_layers": by_layer,
    }  # fmt: skip


def _damping_fields(precond: KFACPreconditioner | None) -> dict[str, Any]:
    """The step record's adaptive damping: lambda after the step (kfac.damping_adaptive only)."""
    damping = precond.damping if precond is not None else None
    return {"damping": damping.value} if isinstance(damping, LevenbergMarquardt) else {}


def _log(context: Context, message: str) -> None:
    if context.rank == 0:
        print(message, file=sys.stderr, flush=True)


def _summed(values: torch.Tensor, context: Context, purpose: str) -> list[float]:
    """``values`` summed over the ranks (in place), as numbers on the host."""
    context.comm.allreduce_sum(values, purpose).wait()
    return values.tolist()


def _load_data(config: Config, context: Context) -> Dataset:
    # The first rank of each node extracts and decodes into the cache; the others then read the cache.
    if context.local_rank != 0:
        barrier(context.comm, context.device)
    data = load_dataset(config.data)
    if context.local_rank == 0:
        barrier(context.comm, context.device)
    return data


# What rank 0 decided about the run's checkpoints, shared as [code, step] (codes below; step: the checkpoint's).
_NO_CHECKPOINT, _RESUME, _NONE_VALID, _NOT_RESUMING = 0, 1, 2, 3


def _decide_checkpoint(config: Config, say: Say) -> tuple[list[int], ConfigError | None]:
    """Rank 0: [code, step] and, for a refusal, its error. Verifies every rank's files; acts on the choice."""
    out_dir = Path(config.run.out_dir)
    if not config.run.resume:
        existing = ckpt.has_checkpoint(out_dir)
        return ([_NOT_RESUMING, existing.step], None) if existing is not None else ([_NO_CHECKPOINT, 0], None)
    choice = ckpt.choose_checkpoint(out_dir)
    if choice.ref is None and choice.rejected:
        return [_NONE_VALID, 0], ckpt.no_valid_checkpoint(choice)
    if choice.ref is None:
        return [_NO_CHECKPOINT, 0], None
    for line in ckpt.set_aside_rejected(choice):
        say(line)
    return [_RESUME, choice.ref.step], None


def _find_checkpoint(config: Config, context: Context, say: Say) -> ckpt.CheckpointRef | None:
    """The checkpoint to resume from, the same on every rank: rank 0 decides (it verifies every rank's files in the
    shared folder) and the others take its decision. Refused without run.resume, since it would overwrite the run.
    """
    out_dir, run = Path(config.run.out_dir), config.run
    decision, error = _decide_checkpoint(config, say) if context.rank == 0 else ([0, 0], None)
    code, step = context.comm.allgather_ints(decision)[0]  # rank 0's, on every rank
    folder = out_dir / ckpt.CHECKPOINT_DIR
    if code == _NOT_RESUMING:
        raise ConfigError(
            f"{out_dir} already holds a run (checkpoint {ckpt.checkpoint_name(step)}): pass --resume "
            "(run.resume=true) to continue it, or choose another run.out_dir"
        )
    if code == _NONE_VALID:
        raise error or ckpt.CheckpointError(f"no valid checkpoint in {folder} to resume from (rank 0 says why)")
    if run.resume and code == _NO_CHECKPOINT:
        say(f"no checkpoint in {out_dir}: starting from step 0")
    for key in ignored_keys(config):
        say(f"note: {key} is ignored")
    return ckpt.CheckpointRef(folder, ckpt.checkpoint_name(step)) if code == _RESUME else None


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


def _noise_record(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    context: Context,
    precond: KFACPreconditioner | None,
    estimator: NoiseScaleEstimator,
    pass_size: int,
) -> dict[str, float | None]:
    """Measures the noise scale on this step's batch, in the step's passes of ``pass_size`` examples, updates
    ``estimator``; the fields for the step's record."""
    # The extra passes must not add to the K-FAC factors of the coming step.
    with precond.paused() if precond is not None else contextlib.nullcontext():
        small, b_small, big, b_big = measure_noise(model, x, y, context, pass_size)
    small_sq, big_sq = torch.stack([small, big]).tolist()  # the measurement's one host synchronisation
    estimator.update(small_sq, b_small, big_sq, b_big)
    return {
        "noise_scale": estimator.b_simple,
        "noise_trace": estimator.trace_sigma,
        "noise_grad_sq": estimator.grad_sq_norm,
    }


def _wrap(model: nn.Module, config: Config, context: Context) -> nn.Module:
    """The module that trains: DDP under torch.distributed with run.ddp; with Horovod or MPI, rank 0's weights
    everywhere (the loop then averages the gradients itself, through the communicator)."""
    if context.kind == "torch" and config.run.ddp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if context.kind in ("horovod", "mpi"):
        state = [tensor for tensor in model.state_dict().values() if tensor.numel()]
        broadcast_from(state, context.comm, purpose="parameters")
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
        "rendezvous": getattr(context, "rendezvous", "none"),  # torch.distributed's meeting point (launch)
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(context.device),
        "step": start_step,
        "indices": batches.indices(epoch, step_in_epoch).tolist(),
    }
    atomic_write_text(out_dir / "ranks" / f"rank{context.rank}.json", json.dumps(record))


class TrainingRun:
    """One invocation of a run on this rank: built (started or resumed) by the constructor, then :meth:`train`.

    Every rank builds one from the same configuration and calls the same methods: most steps run collectives.
    """

    def __init__(self, config: Config, context: Context, say: Say) -> None:
        self.started = time.perf_counter()
        self.config, self.context, self.say = config, context, say
        self.out_dir = Path(config.run.out_dir)
        self.is_main = context.rank == 0
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        if config.run.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        latest = _find_checkpoint(config, context, say)
        self.data = _load_data(config, context)
        self._plan()
        self._build(latest)
        self._open_records()
        self.step = self.start_step
        self.test_loss: float | None = None
        self.test_accuracy: float | None = None
        self.train_loss: float | None = None
        self.train_accuracy: float | None = None
        self.stopped_early = False
        self.prune_reason: str | None = None  # why the starter asked the run to stop (jobs.outcome.PRUNE_REQUEST)
        self.last_checkpoint = time.monotonic()  # rank 0's clock for run.checkpoint_every_s
        self.checkpoint_due = False  # run.checkpoint_every_s has passed (rank 0's answer, shared at a logged step)
        # A resumed run that had stopped at its target is finished: it only reports.
        self.at_target = config.run.stop_at_target and self.steps_to_target is not None

    # ------------------------------------------------------------------ start or resume

    def _plan(self) -> None:
        """This rank's shard of every batch, the run's length and its learning-rate schedule."""
        config, context, run = self.config, self.context, self.config.run
        self.global_batch = config.data.batch_size or len(self.data.train_x)  # 0: full batch
        examples = len(self.data.train_x)
        self.batches = ShardedBatches(examples, self.global_batch, context.rank, context.world_size, run.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = run.steps or run.epochs * self.steps_per_epoch
        if run.step_cap:
            self.total_steps = min(self.total_steps, run.step_cap)
        if run.noise_every and self.batches.local_batch < 2:
            raise ConfigError(
                f"run.noise_every needs at least 2 examples per rank (it splits each rank's batch in two halves); "
                f"the local batch is data.batch_size / ranks = {self.global_batch} / {context.world_size} = "
                f"{self.batches.local_batch}: raise data.batch_size or set run.noise_every = 0"
            )
        self.schedule = make_lr_schedule(config.optim, self.steps_per_epoch, self.total_steps, self.global_batch)

    def _build(self, latest: ckpt.CheckpointRef | None) -> None:
        """Model, optimizer and K-FAC, from ``run.seed`` or from the checkpoint ``latest``."""
        config, context = self.config, self.context
        torch.manual_seed(config.run.seed)  # the same initial weights on every rank
        self.model = build_model(config.model, self.data.input_shape, self.data.classes).to(context.device)
        check_fisher_layer(self.model, config)
        shared: dict[str, Any] | None = None
        mine: dict[str, Any] | None = None
        if latest is not None:
            shared, mine = ckpt.load_checkpoint(latest, context.rank, context.device)
            _check_resumable(shared, config, context, latest)
            self.model.load_state_dict(shared["model"])
        self.resumed = shared is not None
        self.start_step = shared["step"] if shared is not None else 0
        self.train_model = _wrap(self.model, config, context)
        first_lr = self.schedule(min(self.start_step, self.total_steps - 1))
        if config.optim.name == "skip_gd" and context.world_size > 1:
            raise ConfigError("optim.name = 'skip_gd' reads the whole batch on one process: run it on one rank")
        self.optimizer = build_optimizer(config.optim, self.train_model, first_lr, config.model.activation)
        self.precond = (
            build_kfac(config.kfac, self.train_model, self.schedule, context.comm)
            if config.optim.name == "kfac"
            else None
        )
        g_scale = config.kfac.g_scale if self.precond is not None else None
        self.pass_size = pass_examples(
            config.run.micro_batch, self.batches.local_batch, self.model, context.device, g_scale
        )
        self.epoch_totals = torch.zeros(3, dtype=torch.float64, device=context.device)  # loss sum, correct, examples
        self.steps_to_target: int | None = None
        self.noise = NoiseScaleEstimator() if config.run.noise_every else None
        self.adapted: dict[str, float] = {}  # the last step's adaptive-damping fields ({} on other steps)
        if shared is not None and mine is not None:
            self._restore(shared, mine)

    def _restore(self, shared: dict[str, Any], mine: dict[str, Any]) -> None:
        """What evolves besides the model: optimizer, K-FAC, random states, the epoch's sums, target, noise."""
        self.optimizer.load_state_dict(shared["optimizer"])
        if self.precond is not None:
            self.precond.load_state_dict(mine["kfac"])
        ckpt.restore_rng(mine["rng"])
        self.epoch_totals.copy_(mine["epoch_totals"])
        self.steps_to_target = shared.get("steps_to_target")
        if self.noise is not None and mine.get("noise") is not None:
            self.noise.load_state_dict(mine["noise"])

    def _open_records(self) -> None:
        """config.json, the metric files, the progress line, the run's first log line and this rank's record."""
        config, context, run = self.config, self.context, self.config.run
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            payload = {**config.to_dict(), "derived": self._derived()}
            atomic_write_text(self.out_dir / "config.json", json.dumps(payload, indent=2) + "\n")
            (self.out_dir / PRUNE_REQUEST).unlink(missing_ok=True)  # a request to an earlier invocation
        resume_step = self.start_step if self.resumed else None
        self.metrics = MetricsWriter(
            self.out_dir, enabled=self.is_main, tensorboard=run.tensorboard, resume_step=resume_step
        )
        self.progress = ProgressLine(self.total_steps, start=self.start_step, enabled=self.is_main and run.progress)
        data = self.data
        self.say(
            f"{config.model.name} on {config.data.name} ({len(data.train_x)} train / {len(data.test_x)} test), "
            f"{config.optim.name}, batch {self.global_batch} on {context.world_size} rank(s), "
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch)"
            + (f", resuming after step {self.start_step}" if self.resumed else "")
        )
        _write_rank_record(self.out_dir, context, self.batches, self.start_step)

    def _derived(self) -> dict[str, Any]:
        """config.json's ``derived``: what the configuration came to on this machine."""
        data, schedule, context = self.data, self.schedule, self.context
        return {
            "world_size": context.world_size,
            "distributed": context.kind,
            "device": str(context.device),
            "local_batch_size": self.batches.local_batch,
            "pass_examples": self.pass_size,  # run.micro_batch as chosen (jobs.passes)
            "train_examples": len(data.train_x),
            "test_examples": len(data.test_x),
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "peak_lr": schedule.peak,
            "schedule": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(schedule).items()},
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "kfac_layers": self.precond.layer_names if self.precond is not None else [],
            "kfac_factor_shapes": [
                [[a.structure.value, a.dim], [g.structure.value, g.dim]] for a, g in self.precond.factor_shapes
            ]
            if self.precond is not None
            else [],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Steps until the end of the budget, the target or run.stop_after_steps; then the final evaluations."""
        self.train_model.train()
        try:
            while self.step < self.total_steps and not (self.at_target or self.stopped_early or self.prune_reason):
                self.train_step()
            if not self.stopped_early and not self.prune_reason:
                self.finish()
        finally:
            self.close()

    def train_step(self) -> None:
        """One optimizer step, and the records, evaluation and checkpoint that fall after it."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        tick = time.perf_counter()
        x, y = self._batch(epoch, step_in_epoch)
        noise_fields: dict[str, float | None] = {}
        if self.noise is not None and (self.step + 1) % self.config.run.noise_every == 0:
            # Before the training pass, on the unwrapped model: no gradient sync, .grad untouched.
            noise_fields = _noise_record(self.model, x, y, self.context, self.precond, self.noise, self.pass_size)
        if dynamics_due(self.config, self.step) and self.is_main:
            self.metrics.write(dynamics_record(self.model, x, y, self.config, self.step))
        lr = self.schedule(self.step)
        batch_totals = self._optimize(x, y, lr)
        self.step += 1
        skipped = isinstance(self.optimizer, PlateauSkippingGD) and self.step - 1 in self.optimizer.skip_steps[-1:]
        extra = {**noise_fields, **self.adapted, **({"skipped": True} if skipped else {})}
        if self.step % self.config.run.log_every == 0 or self.step == self.total_steps or extra:
            self.log_step(epoch, lr, tick, batch_totals, extra)
        if fisher_due(self.config, self.step, self.steps_per_epoch):
            self.log_fisher(epoch)
        self._after_step(epoch, lr)

    def log_fisher(self, epoch: int) -> None:
        """The ``"fisher"`` record of this step (jobs.diagnostics), on the unwrapped model."""
        started = time.perf_counter()
        fields, values = fisher_record(self.model, self.data, self.config, self.context, self.precond)
        seconds = time.perf_counter() - started
        if self.config.run.fisher_save and self.context.rank == 0:
            save_fisher_values(Path(self.config.run.out_dir), self.step, epoch + 1, values)
        self.metrics.write({"kind": "fisher", "step": self.step, "epoch": epoch + 1, **fields, "seconds": seconds})

    def _batch(self, epoch: int, step_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's examples and labels of the step, augmented as data.augment says, on the device."""
        config, data, batches = self.config, self.data, self.batches
        idx = batches.indices(epoch, step_in_epoch)
        x, y = data.train_x[idx], data.train_y[idx]
        if config.data.augment:
            seed = derive_seed(config.run.seed, epoch, step_in_epoch, 2)
            x = augment_shard(x, batches.shard_slice(), batches.global_batch, seed)
        return data.prepare(x, self.context.device), y.to(self.context.device)

    def _optimize(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Forward, backward, gradients averaged (by DDP, K-FAC or here), the step; this batch's (loss sum, hits, n)."""
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = self._backward(x, y)
        kept = self._keep_for_damping()
        if self.precond is not None:
            try:
                self.precond.step()
            except FloatingPointError as exc:  # NaN/Inf factors: the run diverged, as a NaN loss says
                raise TrainingDiverged(f"{exc} (step {self.step + 1}, lr {lr:g})") from exc
        elif not isinstance(self.train_model, nn.parallel.DistributedDataParallel):
            average_gradients(self.train_model.parameters(), self.context.comm)
        if isinstance(self.optimizer, PlateauSkippingGD):
            self.optimizer.observe(loss.item())
        self.optimizer.step()
        self.adapted = self._adapt_damping(x, y, loss, *kept) if kept is not None else {}
        with torch.no_grad():
            batch_totals = torch.stack([loss.detach().double() * len(y), correct, torch.full_like(correct, len(y))])
            self.epoch_totals += batch_totals
        return batch_totals

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's gradients, in passes of ``pass_size`` examples: the batch's mean loss and its hits."""
        precond = self.precond
        sample = precond.mc_backward if precond is not None and precond.fisher == "mc" else None
        kind = self.config.run.loss

        def loss_of(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return batch_loss(outputs, labels, kind)

        return backward_in_passes(self.train_model, x, y, self.pass_size, loss_of, sample)

    def _keep_for_damping(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """On the steps the adaptive damping judges: theta and the raw gradient (before K-FAC), by name."""
        precond = self.precond
        damping = precond.damping if precond is not None else None
        if precond is None or not isinstance(damping, LevenbergMarquardt) or not damping.due(precond.steps):
            return None
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        before = {name: p.detach().clone() for name, p in named}
        return before, {name: p.grad.detach().clone() for name, p in named if p.grad is not None}

    def _adapt_damping(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss: torch.Tensor,
        before: dict[str, torch.Tensor],
        grad: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """After the step: rho of its update on its batch (all ranks), and the Levenberg-Marquardt rule."""
        assert self.precond is not None
        kind = self.config.run.loss
        likelihood: Likelihood = "gaussian" if kind == "squared" else "categorical"
        adaptation = measure_and_adapt(
            self.precond, self.model, x, lambda out: batch_loss(out, y, kind), loss.detach(), before, grad, likelihood
        )
        return {"damping_rho": adaptation.rho}

    def log_step(
        self, epoch: int, lr: float, tick: float, batch_totals: torch.Tensor, extra_fields: dict[str, Any]
    ) -> None:
        """The step's record (its batch over all ranks); a NaN or infinite loss ends the run as diverged. Rank 0's
        answers to "was the run asked to stop?" and "is a timed checkpoint due?" ride on the same all-reduce, so
        every rank acts on them after this step."""
        request = self._prune_request()
        asks = [float(request is not None), float(self._checkpoint_time_here())]
        asked = torch.tensor(asks, dtype=batch_totals.dtype, device=batch_totals.device)
        loss_sum, correct, count, stop, due = _summed(torch.cat([batch_totals, asked]), self.context, "step sums")
        if stop > 0 and self.step < self.total_steps:
            self.prune_reason = request or "asked by the program that started the run"
        self.checkpoint_due = due > 0
        limit = self.config.run.diverge_above
        if not torch.isfinite(torch.tensor(loss_sum)) or (limit and loss_sum / count > limit):
            above = f", above run.diverge_above = {limit:g}" if limit and math.isfinite(loss_sum) else ""
            raise TrainingDiverged(
                f"the training loss is {loss_sum / count} at step {self.step}{above} (lr {lr:g}): lower optim.lr, "
                "or add warmup (optim.warmup_epochs)"
            )
        seconds = time.perf_counter() - tick
        self.metrics.write(
            {
                "kind": "step",
                "step": self.step,
                "epoch": epoch + 1,
                "loss": loss_sum / count,
                "accuracy": self._accuracy(correct, count),
                "lr": lr,
                "seconds": seconds,
                "examples_per_second": count / max(seconds, 1e-9),
                **extra_fields,
                **_kl_fields(self.precond),
                **_damping_fields(self.precond),
            }
        )
        self.progress.update(self.step, f"epoch {epoch + 1} loss {loss_sum / count:.4f} lr {lr:.4g}")

    def _prune_request(self) -> str | None:
        """Rank 0: the text of the stop request in the run's folder, if there is one (jobs.outcome)."""
        if not self.is_main:
            return None
        try:
            return (self.out_dir / PRUNE_REQUEST).read_text().strip() or "asked by the program that started the run"
        except FileNotFoundError:
            return None

    def _checkpoint_time_here(self) -> bool:
        """Rank 0: whether run.checkpoint_every_s has passed since the last checkpoint (or the start)."""
        every = self.config.run.checkpoint_every_s
        return self.is_main and every > 0 and time.monotonic() - self.last_checkpoint >= every

    def _after_step(self, epoch: int, lr: float) -> None:
        """The epoch's record, an evaluation, a checkpoint and run.stop_after_steps, when they fall on this step."""
        run, step = self.config.run, self.step
        epoch_done = step % self.steps_per_epoch == 0
        last = step == self.total_steps
        if epoch_done or last:
            self.log_epoch(epoch, lr)
        eval_now = (epoch_done and run.eval_every and (epoch + 1) % run.eval_every == 0) or (
            run.eval_every_steps and step % run.eval_every_steps == 0
        )
        if eval_now or last:
            self.evaluate_test(epoch)
            target = run.target_accuracy or None
            reached = target is not None and self.test_accuracy is not None and self.test_accuracy >= target
            if reached and self.steps_to_target is None:
                self.steps_to_target = step
                self.at_target = run.stop_at_target
                if self.at_target and not (epoch_done or last):
                    self.log_epoch(epoch, lr)  # the partial epoch, as at the end of a run
        periodic = run.checkpoint_every and step % run.checkpoint_every == 0
        if self.at_target or last or periodic or self.checkpoint_due:
            self.checkpoint(epoch + int(epoch_done))
        if run.stop_after_steps and step >= run.stop_after_steps and step < self.total_steps and not self.at_target:
            self.stopped_early = True

    def log_epoch(self, epoch: int, lr: float) -> None:
        """The epoch's record (means over the epoch's steps and all ranks), then a fresh epoch's sums."""
        loss_sum, correct, count = _summed(self.epoch_totals.clone(), self.context, "epoch sums")
        self.metrics.write(
            {
                "kind": "epoch",
                "step": self.step,
                "epoch": epoch + 1,
                "loss": loss_sum / count,
                "accuracy": self._accuracy(correct, count),
                "lr": lr,
            }
        )
        self.epoch_totals.zero_()

    def _accuracy(self, correct: float, count: float) -> float | None:
        return None if self.data.regression else correct / count

    def evaluate_test(self, epoch: int) -> None:
        """The test split's loss and accuracy now, recorded."""
        eval_start = time.perf_counter()
        self._share_buffers()
        self.test_loss, self.test_accuracy = evaluate(
            self.model, self.data, self.config.data.eval_batch_size, self.context, loss=self.config.run.loss
        )
        self.metrics.write(
            {
                "kind": "eval",
                "step": self.step,
                "epoch": epoch + 1,
                "test_loss": self.test_loss,
                "test_accuracy": self.test_accuracy,
                "seconds": time.perf_counter() - eval_start,
                **_curvature_fields(self.precond, self.config.kfac.damping, self.context),
            }
        )
        accuracy, loss = self.test_accuracy, self.test_loss
        shown = f"test acc {accuracy:.4f}" if accuracy is not None else f"test loss {loss:.4g}"
        self.progress.update(self.step, f"epoch {epoch + 1} {shown}", force=True)

    def _share_buffers(self) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank, so that all ranks evaluate the same model."""
        buffers = [b for b in self.model.buffers() if b.numel()]
        broadcast_from(buffers, self.context.comm, purpose="buffers")

    def checkpoint(self, epoch: int) -> None:
        """Every rank writes its file; rank 0 then writes the manifest of all files and points ``latest`` at it.

        The digests travel in an allgather, which also waits for every rank's file: the checkpoint is complete,
        and verifiable, only once the manifest exists.
        """
        folder = self.out_dir / ckpt.CHECKPOINT_DIR
        name = ckpt.checkpoint_name(self.step)
        mine = ckpt.atomic_torch_save(self._rank_state(), ckpt.rank_file(folder, name, self.context.rank))
        shared = (
            ckpt.atomic_torch_save(self._shared_state(epoch), ckpt.shared_file(folder, name)) if self.is_main else None
        )
        everyone = self.context.comm.allgather_ints(mine.as_ints())
        if shared is not None:
            digests = {
                ckpt.rank_file(folder, name, r).name: ckpt.FileDigest.from_ints(v) for r, v in enumerate(everyone)
            }
            digests[ckpt.shared_file(folder, name).name] = shared
            ckpt.write_manifest(folder, name, digests)
            ckpt.mark_latest(folder, name)
            ckpt.prune_checkpoints(folder, self.config.run.keep_checkpoints)
        self.last_checkpoint, self.checkpoint_due = time.monotonic(), False

    def _rank_state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT_VERSION,
            "step": self.step,
            "rank": self.context.rank,
            "world_size": self.context.world_size,
            "kfac": self.precond.state_dict() if self.precond is not None else None,
            "rng": ckpt.capture_rng(),
            "epoch_totals": self.epoch_totals.cpu(),
            # The same on every rank (it averages all-reduced norms); kept per rank like the epoch sums.
            "noise": self.noise.state_dict() if self.noise is not None else None,
        }

    def _shared_state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT_VERSION,
            "step": self.step,
            "epoch": epoch,
            "world_size": self.context.world_size,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # So that a resumed run that had reached its target still reports it (and, with stop_at_target,
            # stops at once); evaluations are all-reduced, so every rank knows the same step.
            "steps_to_target": self.steps_to_target,
        }

    # ------------------------------------------------------------------ finish

    def finish(self) -> None:
        """The final evaluations: the test split (unless this step's was done) and the first training examples."""
        data, batch_size, loss = self.data, self.config.data.eval_batch_size, self.config.run.loss
        self._share_buffers()
        self._log_phases()
        if self.test_loss is None:  # resumed a finished run: report its final accuracy
            self.test_loss, self.test_accuracy = evaluate(self.model, data, batch_size, self.context, loss=loss)
        first = self.config.run.train_eval_examples or len(data.train_x)
        self.train_loss, self.train_accuracy = evaluate(
            self.model, data, batch_size, self.context, (data.train_x[:first], data.train_y[:first]), loss
        )

    def _log_phases(self) -> None:
        """With the saddle instruments on: the final reading, then the phases of every reading's loss (rank 0)."""
        if not self.config.run.dynamics_every or not self.is_main:
            return
        if dynamics_due(self.config, self.step):
            x, y = self._batch(*divmod(self.step, self.steps_per_epoch))
            self.metrics.write(dynamics_record(self.model, x, y, self.config, self.step))
        self.metrics.flush()
        record = phases_record(self.out_dir, self.config)
        if record is not None:
            self.metrics.write(record)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        if self.precond is not None:
            self.precond.remove_hooks()
        if isinstance(self.optimizer, PlateauSkippingGD):
            self.optimizer.remove_hooks()

    def summary(self, end: RunEnd, reason: str | None = None) -> RunSummary:
        """What the run reports (rank 0's history fields from metrics.jsonl; call after :meth:`close`)."""
        target = self.config.run.target_accuracy or None
        batch = self.global_batch
        return RunSummary(
            steps=self.step,
            total_steps=self.total_steps,
            epochs=round(self.step / self.steps_per_epoch, 3),
            test_loss=self.test_loss,
            test_accuracy=self.test_accuracy,
            seconds=time.perf_counter() - self.started,
            out_dir=str(self.out_dir),
            stopped_early=self.stopped_early,
            resumed_from=self.start_step if self.resumed else None,
            train_loss=self.train_loss,
            train_accuracy=self.train_accuracy,
            target_accuracy=target,
            steps_to_target=self.steps_to_target,
            examples_to_target=self.steps_to_target * batch if self.steps_to_target is not None else None,
            noise_scale=_finite_or_none(self.noise.b_simple) if self.noise is not None else None,
            reached_target=self.steps_to_target is not None,
            end=end.value,
            reason=reason,
            **(history_fields(self.out_dir) if self.is_main else {}),
        )


def _unstarted_summary(config: Config, started: float, end: RunEnd, reason: str) -> RunSummary:
    """A run that ended while it was being set up: nothing trained in this invocation, its length maybe unknown."""
    return RunSummary(
        steps=0,
        total_steps=0,
        epochs=0.0,
        test_loss=None,
        test_accuracy=None,
        seconds=time.perf_counter() - started,
        out_dir=str(Path(config.run.out_dir)),
        stopped_early=False,
        resumed_from=None,
        end=end.value,
        reason=reason,
    )


def _write_summary(summary: RunSummary) -> None:
    """``summary.json``: how the run ended and what it measured, for programs that started it (jobs.outcome)."""
    atomic_write_text(Path(summary.out_dir) / SUMMARY_JSON, json.dumps(asdict(summary), indent=2) + "\n")


def _report_failure(
    error: BaseException, run: TrainingRun | None, config: Config, context: Context, started: float, say: Say
) -> None:
    """Rank 0 writes what is known of a run that diverged or failed; the caller re-raises ``error``."""
    if isinstance(error, TrainingDiverged):  # the message is the reason, as hpo_worker's in-process trials say it
        end, reason = RunEnd.DIVERGED, str(error)
    else:
        end, reason = RunEnd.FAILED, f"{type(error).__name__}: {error}"
    if context.rank != 0:
        return
    summary = run.summary(end, reason) if run is not None else _unstarted_summary(config, started, end, reason)
    try:
        _write_summary(summary)
    except OSError as write_error:  # the run's own error matters more: it is re-raised
        say(f"cannot write {SUMMARY_JSON} in {config.run.out_dir}: {write_error}")


def run_training(config: Config, context: Context, log: Say | None = None) -> RunSummary:
    """Trains as ``config`` says, on this rank; returns what rank 0 reports (also in summary.json, however it ends).

    Raises what ended the run (TrainingDiverged, or any error) after rank 0 wrote its summary.json, except a
    ConfigError: the run did not start, and the run already in ``run.out_dir`` (if any) keeps its summary.
    """
    started = time.perf_counter()
    say = log or (lambda message: _log(context, message))
    run: TrainingRun | None = None
    try:
        run = TrainingRun(config, context, say)
        run.train()
    except ConfigError:
        raise
    except BaseException as error:  # Ctrl-C too: summary.json says how this invocation ended
        _report_failure(error, run, config, context, started, say)
        raise
    if run.prune_reason:
        summary = run.summary(RunEnd.PRUNED, run.prune_reason)
    else:
        summary = run.summary(RunEnd.STOPPED if run.stopped_early else RunEnd.FINISHED)
    if context.rank == 0:
        _write_summary(summary)
    return summary
