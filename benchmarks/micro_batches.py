"""Seconds per training step on the CPU with the batch in one forward/backward pass or in passes of a few sizes.

Run from the repository root, with nothing else running::

    python -m benchmarks.micro_batches

``run.micro_batch`` (``jobs.passes``) backpropagates a step's batch in passes and leaves their mean gradient, the
one-pass step up to float32 rounding. On the CPU, smaller passes keep a conv model's activations in cache. This
times a momentum-SGD step and a K-FAC step (distkfac as the studies run it: decompositions every 10 steps) of the
conv models with ``jobs.passes.backward_in_passes``, the training loop's own code, at each batch size and pass size,
in ``--rounds`` interleaved rounds at ``--threads`` threads (default 1: one study worker's). ``--steps`` are timed at
batch 256 and proportionally fewer above (at least one, after one untimed): the same for every pass size, so at
large batches the timed steps may hold no decomposition, which costs the same in each way. Inputs are random
CIFAR-10-shaped batches: a dense convolution's time does not depend on the values. It reports the medians and
one pass / passes (above 1: the passes are faster).

``--kinds noise`` times the gradient noise scale's measurement instead (``jobs.noise_scale.measure_noise``, every
``run.noise_every`` steps of a study): two half-batch gradients, each in one pass or in passes of the given size.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.channels_last import MODELS, _timed, chosen_models, interleaved_parser, print_result
from distkfac import KFACPreconditioner
from jobs.models import build_model
from jobs.noise_scale import measure_noise
from jobs.parallel import SingleContext
from jobs.passes import backward_in_passes

KINDS = ("sgd", "kfac", "noise")


def measure_once(name: str, kind: str, batch_size: int, pass_size: int, steps: int) -> float:
    """Seconds per step of a fresh model whose batch is backpropagated in passes of ``pass_size`` (per noise
    measurement, ``kind`` noise)."""
    torch.manual_seed(0)
    model = build_model(MODELS[name], (3, 32, 32), 10)
    if kind == "noise":
        xs, ys = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

        def measurement() -> None:
            measure_noise(model, xs, ys, SingleContext(), pass_size)

        return _timed(measurement, steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precond = KFACPreconditioner(model, damping=1.0, factor_decay=0.95, inv_update_steps=10) if kind == "kfac" else None
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_in_passes(model, x, y, pass_size, F.cross_entropy)
        if precond is not None:
            precond.step()
        optimizer.step()

    return _timed(step, steps)


def measure(models: Sequence[str], batch_sizes: Sequence[int], pass_sizes: Sequence[int], steps: int, rounds: int,
            say: Callable[[str], None], kinds: Sequence[str] = KINDS[:2]) -> dict[str, Any]:  # fmt: skip
    """Per model, kind and batch size: the median seconds of one pass and of each pass size, and the ratios."""
    cases = [(name, kind, b, p) for name in models for kind in kinds for b in batch_sizes
             for p in (b, *[p for p in pass_sizes if p < b and b % p == 0])]  # fmt: skip
    seconds: dict[tuple[str, str, int, int], list[float]] = {case: [] for case in cases}
    for round_ in range(rounds):
        for case in cases:
            seconds[case].append(measure_once(*case, steps=_steps_at(case[2], steps)))
        say(f"round {round_ + 1} of {rounds} done")
    rows = []
    for name, kind, b, p in cases:
        one, mine = statistics.median(seconds[(name, kind, b, b)]), statistics.median(seconds[(name, kind, b, p)])
        spread = max(seconds[(name, kind, b, p)]) / min(seconds[(name, kind, b, p)])
        rows.append({"model": name, "kind": kind, "batch_size": b, "pass_size": p, "seconds": mine,
                     "one_pass_over_passes": one / mine, "max_over_min_of_rounds": spread})  # fmt: skip
    return {"steps_at_256": steps, "threads": torch.get_num_threads(), "rounds": rounds, "rows": rows}


def _steps_at(batch_size: int, steps: int) -> int:
    """``steps`` up to batch 256, proportionally fewer above (at least one)."""
    return steps if batch_size <= 256 else max(1, steps * 256 // batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = interleaved_parser(__doc__, "convnet", "pass size", batch_sizes="512,2048,8192")
    parser.add_argument("--pass-sizes", default="64,128,256", help="comma-separated (default 64,128,256)")
    parser.add_argument(
        "--kinds", default="sgd,kfac", help=f"comma-separated, of {', '.join(KINDS)} (default sgd,kfac)"
    )
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",")]
    if set(kinds) - set(KINDS):
        print(f"unknown --kinds {sorted(set(kinds) - set(KINDS))}: choose from {', '.join(KINDS)}", file=sys.stderr)
        return 2
    models = chosen_models(args.models)
    if models is None:
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    pass_sizes = [int(p) for p in args.pass_sizes.split(",")]
    torch.set_num_threads(args.threads)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = measure(models, batch_sizes, pass_sizes, args.steps, args.rounds, say, kinds)
    rows = [
        [row["model"], row["kind"], str(row["batch_size"]), str(row["pass_size"]), f"{1000 * row['seconds']:.0f}",
         f"{row['one_pass_over_passes']:.2f}", f"{row['max_over_min_of_rounds']:.2f}"]
        for row in result["rows"]
    ]  # fmt: skip
    title = f"{result['threads']} thread(s), median of {args.rounds} rounds; {args.steps} steps at batch 256, "
    title += "fewer above"
    header = ["model", "step", "batch", "examples a pass", "ms a step", "one pass / passes", "rounds' max/min"]
    print_result(title, header, rows, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
