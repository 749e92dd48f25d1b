"""Conv2d input factors on the CPU: the im2col columns' product against oneDNN's weight gradients.

Run from the repository root, with nothing else running::

    python -m benchmarks.conv_factors

distkfac's ``Conv2dHelper.a_factor`` sums ``a a^T`` over every example and output position. The usual way (as
kfac-pytorch) copies the input into im2col columns, ``kh*kw`` times its size, and multiplies them by themselves
(:meth:`~distkfac.layers.Conv2dHelper.a_sum_by_columns`). On the CPU distkfac instead asks oneDNN for the weight
gradient of the convolution whose output gradient is the input seen at each kernel offset
(:meth:`~distkfac.layers.Conv2dHelper.a_sum_by_weight_grads`): the same products, read in place. This times both,
in ``--rounds`` interleaved rounds at ``--threads`` threads (default 1: one study worker's), on the inputs each
convolution of the model sees in a forward pass (random CIFAR-10-shaped images, channels-last as the models run),
and a whole K-FAC step (distkfac as the studies run it: decompositions every 10 steps) with each way. It reports
medians, columns / weight gradients (above 1: the weight gradients are faster), the rounds' spread, and each
way's largest error against the float64 factor, relative to its largest entry.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.channels_last import MODELS, _step, _timed, interleaved_parser
from distkfac.layers import Conv2dHelper
from jobs.models import build_model

WAYS = ("columns", "weight_grads")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return interleaved_parser(__doc__, "convnet,resnet20", "way").parse_args(argv)


def conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Conv2d, torch.Tensor]]:
    """Each Conv2d of ``model`` (groups 1) with the input it sees in a forward pass of ``x``."""
    seen: dict[str, tuple[nn.Conv2d, torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, _o, name=name: seen.__setitem__(name, (m, i[0].detach())))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


@contextlib.contextmanager
def factors_by(way: str) -> Iterator[None]:
    """Within: every Conv2dHelper on the CPU sums its input factor the given way (the class's default otherwise)."""
    default = Conv2dHelper.a_sum_by_weight_grads
    if way == "columns":
        Conv2dHelper.a_sum_by_weight_grads = Conv2dHelper.a_sum_by_columns  # type: ignore[method-assign]
    try:
        yield
    finally:
        Conv2dHelper.a_sum_by_weight_grads = default  # type: ignore[method-assign]


def _step_seconds(name: str, way: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    with factors_by(way):
        return _timed(_step(build_model(MODELS[name], (3, 32, 32), 10), "kfac", x, y), steps)


def _errors(conv: nn.Conv2d, seen: torch.Tensor) -> dict[str, Any]:
    """Each way's largest error against the float64 factor, relative to its largest entry."""
    helper = Conv2dHelper(conv)
    exact = helper.a_sum_by_columns(seen.double())
    errors = {
        f"{way}_error": float(
            (getattr(helper, f"a_sum_by_{way}")(seen).double() - exact).abs().max() / exact.abs().max()
        )
        for way in WAYS
    }
    return {"input": list(seen.shape), "a_dim": helper.a_dim, **errors}


def measure_model(name: str, batch_size: int, steps: int, rounds: int) -> list[dict[str, Any]]:
    """Per convolution and for the whole K-FAC step: the median seconds of each way, their ratio, the spread."""
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    inputs = conv_inputs(build_model(MODELS[name], (3, 32, 32), 10), x)
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for layer, (conv, seen) in inputs.items():
            helper = Conv2dHelper(conv)
            for way in WAYS:
                run = functools.partial(getattr(helper, f"a_sum_by_{way}"), seen)
                seconds.setdefault((layer, way), []).append(_timed(run, steps))
        for way in WAYS:
            seconds.setdefault(("K-FAC step", way), []).append(_step_seconds(name, way, x, y, steps))
    rows = []
    for layer in [*inputs, "K-FAC step"]:
        columns, grads = seconds[(layer, "columns")], seconds[(layer, "weight_grads")]
        row: dict[str, Any] = {"model": name, "layer": layer, "columns_s": statistics.median(columns)}
        row |= {
            "weight_grads_s": statistics.median(grads),
            "max_over_min_of_rounds": max(max(v) / min(v) for v in (columns, grads)),
        }
        row["speedup"] = row["columns_s"] / row["weight_grads_s"]
        if layer in inputs:
            row |= _errors(*inputs[layer])
        rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        f"batch {result['batch_size']}, {result['threads']} thread(s), median of {result['rounds']} rounds",
        "| model | layer | input | A | columns (ms) | weight gradients (ms) | columns / weight gradients "
        "| rounds' max/min | error of columns | error of weight gradients |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        shape = "x".join(map(str, row.get("input", []))) or "-"
        errors = [f"{row[f'{way}_error']:.1e}" if f"{way}_error" in row else "-" for way in WAYS]
        lines.append(
            f"| {row['model']} | {row['layer']} | {shape} | {row.get('a_dim', '-')} | {row['columns_s'] * 1e3:.1f} "
            f"| {row['weight_grads_s'] * 1e3:.1f} | {row['speedup']:.2f} | {row['max_over_min_of_rounds']:.2f} "
            f"| {errors[0]} | {errors[1]} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        print(f"conv_factors: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = [row for name in names for row in measure_model(name, args.batch_size, args.steps, args.rounds)]
    result = {"batch_size": args.batch_size, "steps": args.steps, "threads": args.threads, "rounds": args.rounds}
    result["rows"] = rows
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
