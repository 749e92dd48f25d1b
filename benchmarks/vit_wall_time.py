"""AdamW against distkfac's K-FAC on the small ViT and Fashion-MNIST, each for the same wall-clock budget.

Run from the repository root (one process, CPU; nothing else should run on the machine meanwhile)::

    python -m benchmarks.vit_wall_time --seconds 120 --seeds 0,1,2 --threads 2 --out runs/vit_wall_time
    python -m benchmarks.vit_wall_time --seconds 5 --seeds 0 --out /tmp/vit_smoke      # a smoke test

For every seed and method the model of ``jobs/configs/vit_fashion_{adamw,kfac}.toml`` (ViT width 64, depth 2,
4 heads, patch 7) is built from that seed with jobs' own builders (``jobs.models.build_model``,
``jobs.optim.build_optimizer``, ``jobs.optim.build_kfac``, ``jobs.datasets.load_dataset``) and trained on shuffled
batches of the full training split until its *training* clock reaches ``--seconds``. The clock runs over everything
a step does (batch, forward, backward, K-FAC factors and decompositions, the optimizer) and stops during the
evaluations on the test split at the ``--marks`` evenly spaced time marks (and at 0 s), which therefore cost neither
method any budget. A step is not cut: the last one may end past the budget by less than one step's time.

Hyperparameters are the shipped configs' (printed in the output), which are common defaults and were NOT tuned for
this comparison nor toward any answer: AdamW lr 1e-3, weight decay 0.05, betas (0.9, 0.999); K-FAC (eigen, damping
1e-3, factor decay 0.95, factors every step, decompositions every 10 steps, KL clip 1e-3) with momentum SGD lr 0.05,
momentum 0.5; batch 128, 100 warm-up steps for both. The only change: the schedule after warm-up is constant
(``optim.schedule=constant``), since a linear decay needs the number of steps, which a time budget does not fix.
``--set section.key=value`` changes both configs alike.

Output under ``--out``: ``cells/<method>_seed<k>.json`` (one per finished run, reused when the script is run again
with the same settings: interrupted runs resume cell by cell), ``wall_time.csv`` (one row per method, seed and mark)
and ``wall_time.md`` (means +- standard errors over the seeds at each mark).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distkfac import KFACPreconditioner, SingleProcessCommunicator
from jobs.config import Config, load_config
from jobs.datasets import Dataset, load_dataset
from jobs.models import build_model
from jobs.objective import batch_loss, hits
from jobs.optim import build_kfac, build_optimizer, make_lr_schedule, set_lr

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"adamw": ROOT / "jobs/configs/vit_fashion_adamw.toml", "kfac": ROOT / "jobs/configs/vit_fashion_kfac.toml"}
FIXED = ("optim.schedule=constant",)
CSV_COLUMNS = ("method", "seed", "mark_s", "train_s", "steps", "train_loss", "test_loss", "test_accuracy")


def method_config(method: str, overrides: Sequence[str]) -> Config:
    return load_config(CONFIGS[method], [*FIXED, *overrides])


def evaluate(model: torch.nn.Module, data: Dataset, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the test split."""
    model.eval()
    loss_sum, correct = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(data.test_x), batch_size):
            x = data.prepare(data.test_x[start : start + batch_size], torch.device("cpu"))
            y = data.test_y[start : start + batch_size]
            logits = model(x)
            loss_sum += float(batch_loss(logits, y, "cross_entropy", reduction="sum"))
            correct += float(hits(logits, y))
    model.train()
    return loss_sum / len(data.test_x), correct / len(data.test_x)


class Trainer:
    """One method, one seed: the model, its optimizer (and K-FAC), the shuffled batches."""

    def __init__(self, config: Config, data: Dataset, seed: int) -> None:
        torch.manual_seed(seed)
        self.config, self.data = config, data
        self.model = build_model(config.model, data.input_shape, data.classes)
        batch = config.data.batch_size
        self.schedule = make_lr_schedule(config.optim, len(data.train_x) // batch, 10**12, batch)
        self.optimizer = build_optimizer(config.optim, self.model, self.schedule(0))
        self.precond: KFACPreconditioner | None = None
        if config.optim.name == "kfac":
            self.precond = build_kfac(config.kfac, self.model, self.schedule, SingleProcessCommunicator())
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.step = 0
        self.recent: list[float] = []  # training losses since the last mark

    def train_step(self) -> None:
        batch = self.config.data.batch_size
        if len(self.order) < batch:
            self.order = torch.randperm(len(self.data.train_x), generator=self.generator)
        idx, self.order = self.order[:batch], self.order[batch:]
        x = self.data.prepare(self.data.train_x[idx], torch.device("cpu"))
        y = self.data.train_y[idx]
        set_lr(self.optimizer, self.schedule(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(self.model(x), y, "cross_entropy")
        loss.backward()
        if self.precond is not None:
            self.precond.step()
        self.optimizer.step()
        self.step += 1
        self.recent.append(loss.item())
        if not math.isfinite(self.recent[-1]):
            raise FloatingPointError(f"{self.config.optim.name}: training loss {self.recent[-1]} at step {self.step}")


def run_cell(config: Config, data: Dataset, seed: int, seconds: float, marks: int) -> list[dict[str, Any]]:
    """Train until the training clock reaches ``seconds``; a record at 0 s and at each of ``marks`` even marks."""
    trainer = Trainer(config, data, seed)
    targets = [seconds * i / marks for i in range(marks + 1)]
    records: list[dict[str, Any]] = []
    train_s = 0.0
    for mark in targets:
        while train_s < mark:
            started = time.perf_counter()
            trainer.train_step()
            train_s += time.perf_counter() - started
        test_loss, test_accuracy = evaluate(trainer.model, data, config.data.eval_batch_size)
        train_loss = statistics.fmean(trainer.recent) if trainer.recent else float("nan")
        trainer.recent = []
        records.append(
            {"mark_s": mark, "train_s": round(train_s, 4), "steps": trainer.step, "train_loss": train_loss,
             "test_loss": test_loss, "test_accuracy": test_accuracy}
        )  # fmt: skip
    return records


def settings_key(args: argparse.Namespace, method: str) -> str:
    """What a cell's result depends on: a rerun with other settings recomputes it."""
    config = method_config(method, args.set).to_dict()
    described = {"config": config, "seconds": args.seconds, "marks": args.marks, "threads": torch.get_num_threads()}
    described["data"] = [args.train_examples, args.test_examples]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def cached_cell(args: argparse.Namespace, method: str, seed: int, data: Dataset) -> list[dict[str, Any]]:
    path = Path(args.out) / "cells" / f"{method}_seed{seed}.json"
    key = settings_key(args, method)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == key:
            print(f"{method} seed {seed}: reused {path}", flush=True)
            return list(saved["records"])
    config = method_config(method, args.set)
    records = run_cell(config, data, seed, args.seconds, args.marks)
    last = records[-1]
    print(
        f"{method} seed {seed}: {last['steps']} steps in {last['train_s']:.1f} s, test accuracy "
        f"{last['test_accuracy']:.4f}, test loss {last['test_loss']:.4f}",
        flush=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"settings": key, "records": records}, indent=1))
    temporary.replace(path)
    return records


def mean_se(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def markdown(rows: Sequence[dict[str, Any]], methods: Sequence[str], header: Sequence[str]) -> str:
    lines = [*header, "", "| time mark (s) | method | steps | train loss | test loss | test accuracy |"]
    lines.append("|---:|---|---:|---:|---:|---:|")
    for mark in sorted({row["mark_s"] for row in rows}):
        for method in methods:
            cell = [row for row in rows if row["mark_s"] == mark and row["method"] == method]
            if not cell:
                continue
            steps = statistics.fmean(row["steps"] for row in cell)
            losses = [row["train_loss"] for row in cell if math.isfinite(row["train_loss"])]
            train = mean_se(losses) if losses else "–"
            test_loss = mean_se([row["test_loss"] for row in cell])
            test_accuracy = mean_se([row["test_accuracy"] for row in cell])
            lines.append(f"| {mark:.4g} | {method} | {steps:.0f} | {train} | {test_loss} | {test_accuracy} |")
    return "\n".join(lines) + "\n"


def header_lines(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    command = " ".join(["python -m benchmarks.vit_wall_time", *map(shlex.quote, argv)])
    lines = [
        "## AdamW vs K-FAC (distkfac) on a small ViT, Fashion-MNIST, equal wall time",
        "",
        f"- command: `{command}`",
        f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, load average at start "
        + ", ".join(f"{load:.2f}" for load in os.getloadavg()),
        f"- budget {args.seconds:g} s of training per method and seed (evaluations not counted), seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± standard error over seeds",
        "- train loss: the mean over the steps since the previous mark; test: the whole test split at the mark",
    ]
    for method in args.methods:
        c = method_config(method, args.set)
        o, k = c.optim, c.kfac
        text = f"lr {o.lr:g}, weight decay {o.weight_decay:g}, batch {c.data.batch_size}, warm-up {o.warmup_steps}"
        if method == "kfac":
            text += (
                f", momentum {o.momentum:g}, {k.compute_method}, damping {k.damping:g}, factor decay "
                f"{k.factor_decay:g}, decompositions every {k.inv_update_steps} steps, KL clip {k.kl_clip:g}"
            )
        lines.append(f"- {method} ({CONFIGS[method].relative_to(ROOT)}, schedule constant): {text}; not tuned")
    return lines


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall time per method and seed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--marks", type=int, default=6, help="evaluations at this many evenly spaced time marks")
    parser.add_argument("--methods", default="adamw,kfac", help="comma-separated, from: adamw, kfac")
    parser.add_argument("--out", required=True, help="folder for cells/, wall_time.csv and wall_time.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--train-examples", type=int, default=0, help="use the first N training examples (0 = all)")
    parser.add_argument("--test-examples", type=int, default=0, help="evaluate on the first N test examples (0 = all)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value for both configs")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.seeds or not set(args.methods) <= set(CONFIGS) or not args.methods:
        parser.error(f"--seeds needs seeds and --methods names from {', '.join(CONFIGS)}")
    if args.seconds <= 0 or args.marks < 1:
        parser.error("--seconds must be > 0 and --marks >= 1")
    args.set = [*args.set, f"data.train_examples={args.train_examples}", f"data.test_examples={args.test_examples}"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = load_dataset(method_config(args.methods[0], args.set).data)  # the [data] tables of both configs agree
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method in args.methods:
            records = cached_cell(args, method, seed, data)
            rows += [{"method": method, "seed": seed, **record} for record in records]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "wall_time.csv").open("w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for row in rows:
            f.write(",".join(str(row[column]) for column in CSV_COLUMNS) + "\n")
    table = markdown(rows, args.methods, header_lines(args, argv))
    (out / "wall_time.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
