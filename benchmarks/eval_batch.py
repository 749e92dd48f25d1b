"""Seconds to evaluate a study's test split at several evaluation batch sizes (``data.eval_batch_size``).

Run from the repository root, with nothing else running::

    python -m benchmarks.eval_batch --config jobs/configs/studies/critical_cifar10_cnn.toml

It builds the study's first cell (model, data, ``data.test_examples``) as ``jobs.train`` would, and times
``jobs.loop.evaluate`` (the function every evaluation of a run calls) on the test split at each ``--batch-sizes``,
at ``--threads`` threads, in ``--rounds`` interleaved rounds (a drift of the machine touches every size alike), and
reports the median per size and its ratio to the fastest. The evaluation batch changes no number, only the time:
the accuracies are checked equal across sizes, and the losses to 1e-6 relative (float32 sums per batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jobs.config import load_config
from jobs.datasets import load_dataset, resolve_data_path
from jobs.loop import evaluate
from jobs.models import build_model
from jobs.parallel import SingleContext
from study.config import cell_toml, load_study


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study's TOML file (jobs/configs/studies/)")
    parser.add_argument("--batch-sizes", default="1000,200,100,50,25", help="comma-separated (default 1000..25)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one study worker's)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every size, interleaved (default 3)")
    parser.add_argument("--out", help="also write the result as JSON here")
    return parser.parse_args(argv)


def measure(config_path: str, sizes: Sequence[int], rounds: int) -> dict[str, Any]:
    """Median seconds per evaluation of the test split by batch size, and the results, which must agree."""
    study = load_study(config_path)
    with tempfile.TemporaryDirectory() as tmp:
        cell_file = Path(tmp) / "cell.toml"
        cell_file.write_text(cell_toml(study, study.cells()[0]))
        config = load_config(cell_file, [])
    resolve_data_path(config.data)
    data = load_dataset(config.data)
    torch.manual_seed(0)
    model = build_model(config.model, data.input_shape, data.classes)
    context = SingleContext()
    evaluate(model, data, max(sizes), context)  # warm-up: first-touch allocations
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    results: dict[int, tuple[float, float | None]] = {}
    for _ in range(rounds):
        for size in sizes:
            started = time.perf_counter()
            results[size] = evaluate(model, data, size, context)
            seconds[size].append(time.perf_counter() - started)
    losses = [loss for loss, _ in results.values()]
    # Each batch's loss is a float32 sum: the order of additions moves the mean in its 7th digit, no more.
    if max(losses) - min(losses) > 1e-6 * abs(max(losses)) or len({acc for _, acc in results.values()}) > 1:
        raise RuntimeError(f"the evaluation batch changed the test loss or accuracy: {results}")
    medians = {size: statistics.median(values) for size, values in seconds.items()}
    return {
        "model": config.model.name, "test_examples": len(data.test_x), "threads": torch.get_num_threads(),
        "rounds": rounds, "seconds": medians, "test_loss": losses[0],
        "max_over_min_of_rounds": {size: max(v) / min(v) for size, v in seconds.items()},
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    result = measure(args.config, sizes, args.rounds)
    fastest = min(result["seconds"].values())
    print(f"{result['model']}, {result['test_examples']} test images, {result['threads']} thread(s), median of "
          f"{args.rounds} rounds")  # fmt: skip
    print("| eval batch | seconds | per 1000 images (ms) | / fastest | rounds' max/min |\n|---|---|---|---|---|")
    for size, value in result["seconds"].items():
        per_thousand = 1000 * value / result["test_examples"] * 1000
        spread = result["max_over_min_of_rounds"][size]
        print(f"| {size} | {value:.2f} | {per_thousand:.0f} | {value / fastest:.2f} | {spread:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
