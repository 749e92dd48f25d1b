"""Seconds per training step and per evaluation forward of the conv models, NCHW against channels-last on the CPU.

Run from the repository root, with nothing else running::

    python -m benchmarks.channels_last

The conv models put their activations in channels-last memory order on the CPU (``jobs.models.cpu_channels_last``;
the ``channels_last`` attribute turns it off). This times both orders side by side, in ``--rounds`` interleaved
rounds, at ``--threads`` threads (default 1: one study worker's), for each model: a momentum-SGD step, a K-FAC step
(distkfac as the studies run it: decompositions every 10 steps, so ``--steps`` 10 holds one) and a forward pass
of an evaluation batch of 100. Inputs are random CIFAR-10-shaped batches: a dense convolution's time does not
depend on the values. It reports the medians and NCHW / channels-last (above 1: channels-last is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from jobs.config import ModelConfig
from jobs.models import build_model, set_channels_last

# The CIFAR-10 study's ConvNet (critical_cifar10_cnn.toml), LeNet-5 (the large-batch tuning study), ResNet-20.
MODELS = {
    "convnet": ModelConfig(name="convnet", channels=[16, 32, 32, 32], hidden=[128]),
    "lenet5": ModelConfig(name="lenet5"),
    "resnet20": ModelConfig(name="resnet", depth=20),
}
KINDS = ("sgd", "kfac", "eval")


def interleaved_parser(
    description: str | None, models: str, compared: str, batch_sizes: str | None = None
) -> argparse.ArgumentParser:
    """The options of a benchmark that times ways of the same work on MODELS in interleaved rounds: at one batch
    size, or with ``batch_sizes`` (their default) at several."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models, help=f"comma-separated, of {', '.join(MODELS)}")
    if batch_sizes is None:
        parser.add_argument("--batch-size", type=int, default=256, help="training batch (default 256)")
    else:
        parser.add_argument("--batch-sizes", default=batch_sizes, help=f"comma-separated (default {batch_sizes})")
    parser.add_argument("--steps", type=int, default=10, help="timed calls or steps per measurement (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one study worker's)")
    rounds_help = f"measurements of each {compared}, interleaved (default 3)"
    parser.add_argument("--rounds", type=int, default=3, help=rounds_help)
    parser.add_argument("--out", help="also write the result as JSON here")
    return parser


def chosen_models(text: str) -> list[str] | None:
    """``--models`` as names; None, after a message naming the choices, when one is unknown."""
    models = [name.strip() for name in text.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}", file=sys.stderr)
        return None
    return models


def print_result(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], result: Mapping[str, Any], out: str | None
) -> None:
    """The benchmark's markdown table (the first two columns text, the others numbers), and its JSON to ``out``."""
    print(title)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return interleaved_parser(__doc__, ",".join(MODELS), "order").parse_args(argv)


def _timed(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first-touch allocations, oneDNN's primitive cache
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def _step(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precond = KFACPreconditioner(model, damping=1.0, factor_decay=0.95, inv_update_steps=10) if kind == "kfac" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if precond is not None:
            precond.step()
        optimizer.step()

    return step


def measure_once(name: str, kind: str, channels_last: bool, batch_size: int, steps: int) -> float:
    """Seconds per step (``sgd``, ``kfac``) or per forward of 100 images (``eval``) of a fresh model."""
    torch.manual_seed(0)
    model = build_model(MODELS[name], (3, 32, 32), 10)
    set_channels_last(model, channels_last)
    if kind == "eval":
        model.eval()
        images = torch.randn(100, 3, 32, 32)

        def forward() -> None:
            with torch.inference_mode():
                model(images)

        return _timed(forward, steps)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    return _timed(_step(model, kind, x, y), steps)


def measure(models: Sequence[str], batch_size: int, steps: int, rounds: int) -> dict[str, Any]:
    """Per model and kind: the median seconds of each order, their ratio and the rounds' spread."""
    seconds: dict[tuple[str, str, bool], list[float]] = {}
    for _ in range(rounds):
        for name in models:
            for kind in KINDS:
                for channels_last in (False, True):
                    value = measure_once(name, kind, channels_last, batch_size, steps)
                    seconds.setdefault((name, kind, channels_last), []).append(value)
    rows = []
    for name in models:
        for kind in KINDS:
            nchw, last = seconds[(name, kind, False)], seconds[(name, kind, True)]
            nchw_s, last_s = statistics.median(nchw), statistics.median(last)
            rows.append({
                "model": name, "kind": kind, "nchw_s": nchw_s, "channels_last_s": last_s, "speedup": nchw_s / last_s,
                "max_over_min_of_rounds": max(max(v) / min(v) for v in (nchw, last)),
            })  # fmt: skip
    threads = torch.get_num_threads()
    return {"batch_size": batch_size, "steps": steps, "threads": threads, "rounds": rounds, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    models = chosen_models(args.models)
    if models is None:
        return 2
    torch.set_num_threads(args.threads)
    result = measure(models, args.batch_size, args.steps, args.rounds)
    rows = [
        [row["model"], row["kind"], f"{1000 * row['nchw_s']:.1f}", f"{1000 * row['channels_last_s']:.1f}",
         f"{row['speedup']:.2f}", f"{row['max_over_min_of_rounds']:.2f}"]
        for row in result["rows"]
    ]  # fmt: skip
    title = f"batch {args.batch_size} (eval: 100), {result['threads']} thread(s), median of {args.rounds} rounds"
    header = ["model", "step", "NCHW (ms)", "channels-last (ms)", "NCHW / channels-last", "rounds' max/min"]
    print_result(title, header, rows, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
