"""Wall time to target: steps to target times the cost of a step, and the best batch size for a number of devices.

Steps alone favour the optimizer whose steps are dearest (K-FAC's step costs more than SGD's). A user choosing an
optimizer for P devices needs the time: with data parallelism at global batch B, each device computes a local batch
of B / P, so

    time(P, B) = S(B) * t(B / P)

where S(B) is the study's steps to target and t(b) the measured cost of one training step at local batch b
(``benchmarks/step_cost.py``, one thread). For each P the best B gives the *frontier* time(P) = min_B time(P, B);
local batches below the smallest measured one are left out. Communication is modelled, where the benchmark wrote
it (``benchmarks/step_comm.py``: the gradient allreduce, and K-FAC's factor and decomposition exchanges, on a stated
network, not overlapped): t(b) + c(P). Left out, and the report says so: evaluation, and any other loss of
efficiency from running P devices. K-FAC's measured step includes all of its decompositions, which distkfac shares
out among the ranks (docs/kfac.md); where the benchmark also measured their part d(b) and distkfac's share-out
s(P) (the sum of their ``n^3`` costs over the busiest rank's), K-FAC's step on P devices is t(b) - d(b) + d(b) / s(P),
and the report says how much that changes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "STEP_COST_JSON", "FrontierPoint", "OwnTime", "StepCosts", "cost_section", "frontier", "load_step_costs",
    "own_time_to_target", "time_to_target",
]  # fmt: skip

STEP_COST_JSON: Final = "step_cost.json"  # in the study's out_dir, written by benchmarks/step_cost.py
COST_PLOT: Final = "cost_frontier.png"


# A step or evaluation this many times the run's median of its kind, and this long, was a paused process (SIGSTOP,
# a suspended machine), not work: on CIFAR-10 the study's paused trials held single steps of 58-72 minutes, and the
# slowest real steps (those that also measure the noise scale) cost 2-3x the median. Both, because the MLP's 1-ms
# steps have hiccups of 10x (a first step, a collection) that are the machine's, and short.
PAUSED_FACTOR: Final = 10.0
PAUSED_AFTER_S: Final = 60.0


@dataclass(frozen=True)
class OwnTime:
    """A run's own time to its target (:func:`own_time_to_target`), and how many records counted at the median."""

    seconds: float
    paused: int


def own_time_to_target(records: Iterable[Mapping[str, Any]], steps_to_target: float) -> OwnTime | None:
    """The seconds a run's training steps and evaluations took up to the step that reached the target, from its
    metrics records (those of every attempt of a resumed run); None without step times. A summary's ``seconds`` is
    neither: it holds only the last attempt, and the time the process spent stopped. A record longer than
    PAUSED_FACTOR times the median of its kind and longer than PAUSED_AFTER_S counts at the median."""
    mine = [r for r in records if isinstance(r.get("seconds"), int | float) and r.get("step", 0) <= steps_to_target]
    total, paused = 0.0, 0
    for kind in ("step", "eval"):
        times = [float(r["seconds"]) for r in mine if r.get("kind") == kind]
        if not times:
            continue
        median = statistics.median(times)
        limit = max(PAUSED_FACTOR * median, PAUSED_AFTER_S)
        paused += sum(t > limit for t in times)
        total += sum(median if t > limit else t for t in times)
    if not any(r.get("kind") == "step" for r in mine):
        return None
    return OwnTime(total, paused)


@dataclass(frozen=True)
class FrontierPoint:
    """The fastest way to the target with ``devices`` devices available: the global batch, the time it takes, and
    the devices it uses (fewer than ``devices`` when more would not be faster)."""

    devices: int
    batch_size: int
    seconds: float
    used: int

    def text(self) -> str:
        on = f" on {self.used}" if self.used != self.devices else ""
        return f"{self.seconds:.2f} s at B = {self.batch_size}{on}"


@dataclass(frozen=True)
class StepCosts:
    """Seconds per training step by optimizer and local batch on one device (``benchmarks/step_cost.py``); for
    K-FAC also the part that is decompositions, and how far distkfac shares them out over P devices."""

    seconds: Mapping[str, Mapping[int, float]]
    decompositions: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    speedup: Mapping[int, float] = field(default_factory=dict)  # devices -> sum of costs / the busiest rank's
    communication: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # optimizer -> devices -> s

    def on(self, optimizer: str, devices: int, shared: bool = True, communicate: bool = True) -> dict[int, float]:
        """The step cost by local batch on ``devices`` devices: with ``shared``, t(b) - d(b) + d(b) / s(P) (beyond
        the largest P measured, its s); without, every decomposition on every device, t(b). With ``communicate``,
        plus the modelled communication c(P), where the file has it (beyond the largest P modelled, its c)."""
        measured = self.seconds.get(optimizer, {})
        part = self.decompositions.get(optimizer, {})
        costs = dict(measured)
        if shared and part and self.speedup:
            speedup = self.speedup.get(devices) or self.speedup[max(self.speedup)]
            costs = {b: t - part.get(b, 0.0) * (1 - 1 / speedup) for b, t in measured.items()}
        comm = self.communication.get(optimizer, {})
        if communicate and comm:
            extra = comm.get(devices, comm[max(comm)])
            costs = {b: t + extra for b, t in costs.items()}
        return costs


def load_step_costs(path: Path) -> StepCosts:
    """Step costs from ``benchmarks/step_cost.py``'s JSON file (files from before the decompositions were measured
    have none)."""
    raw = json.loads(path.read_text())
    try:
        return StepCosts(
            seconds=_by_batch(raw["seconds_per_step"]),
            decompositions=_by_batch(raw.get("decomposition_seconds_per_step", {})),
            speedup={int(p): float(s) for p, s in raw.get("decomposition_speedup", {}).items()},
            communication=_by_batch(raw.get("communication_seconds_per_step", {})),  # keyed by devices, not batch
        )
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a step-cost file ({exc!r}); make it with python -m benchmarks.step_cost --config <study>"
        ) from None


def _by_batch(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    return {o: {int(b): float(s) for b, s in by_batch.items()} for o, by_batch in raw.items()}


def time_to_target(steps: Mapping[int, float], seconds: Mapping[int, float], devices: int) -> dict[int, float]:
    """time(P, B) = S(B) * t(B / P) for every global batch B whose local batch B / P was measured."""
    return {
        batch: s * seconds[batch // devices]
        for batch, s in steps.items()
        if batch % devices == 0 and batch // devices in seconds
    }


def frontier(
    steps: Mapping[str, Mapping[int, float]],
    costs: StepCosts,
    shared: bool = True,
    communicate: bool = True,
) -> dict[str, list[FrontierPoint]]:
    """Per optimizer, the best global batch and time with P = 1, 2, 4, ... devices available, as long as some batch
    size leaves a measured local batch. A user may leave devices idle, so the time never rises with P: where using
    all P is slower, the point keeps the best of fewer devices (``used``). ``shared``: K-FAC's decompositions
    shared out as distkfac does, where measured; ``communicate``: the modelled communication added, where the file
    has it (:meth:`StepCosts.on`)."""
    result: dict[str, list[FrontierPoint]] = {}
    for optimizer in steps:
        if optimizer not in costs.seconds:
            continue
        points: list[FrontierPoint] = []
        devices = 1
        while times := time_to_target(steps[optimizer], costs.on(optimizer, devices, shared, communicate), devices):
            batch = min(times, key=lambda b: times[b])
            best = FrontierPoint(devices, batch, times[batch], devices)
            if points and points[-1].seconds < best.seconds:
                best = FrontierPoint(devices, points[-1].batch_size, points[-1].seconds, points[-1].used)
            points.append(best)
            devices *= 2
        result[optimizer] = points
    return result


def fastest_by_devices(curves: Mapping[str, list[FrontierPoint]]) -> list[dict[str, Any]]:
    """Per device count: every optimizer's frontier point, the fastest, and its lead over the runner-up."""
    by_devices: dict[int, dict[str, FrontierPoint]] = {}
    for optimizer, curve in curves.items():
        for point in curve:
            by_devices.setdefault(point.devices, {})[optimizer] = point
    rows = []
    for devices, points in sorted(by_devices.items()):
        ranked = sorted(points, key=lambda o: points[o].seconds)
        lead = points[ranked[1]].seconds / points[ranked[0]].seconds if len(ranked) > 1 else None
        rows.append({"devices": devices, "points": points, "fastest": ranked[0], "lead": lead})
    return rows


def _cell_table(steps: Mapping[str, Mapping[int, float]], costs: StepCosts, own: Mapping[str, Any]) -> list[str]:
    """Per cell on one device: steps, the step's cost (and its decompositions, where measured), their product, and
    the best run's own time to target (:func:`own_time_to_target`)."""
    from study.report import markdown_table

    parts = any(costs.decompositions.values())
    rows = []
    for optimizer, by_batch in steps.items():
        for batch, s in sorted(by_batch.items()):
            cost = costs.seconds.get(optimizer, {}).get(batch)
            part = costs.decompositions.get(optimizer, {}).get(batch)
            measured = own.get(optimizer, {}).get(batch)
            row = [optimizer, str(batch), f"{s:.0f}", f"{cost * 1e3:.2f}" if cost else "–"]
            row += [f"{part * 1e3:.2f}" if part is not None else "–"] if parts else []
            row += [f"{s * cost:.2f}" if cost else "–", f"{measured.seconds:.1f}" if measured else "–"]
            rows.append(row)
    header = ["optimizer", "batch", "steps to target", "ms per step"]
    header += ["of which decompositions (ms)"] if parts else []
    header += ["steps × step (s)", "best run's own time to target (s)"]
    return [markdown_table(header, rows), ""]


def _frontier_table(curves: Mapping[str, list[FrontierPoint]]) -> list[str]:
    from study.report import markdown_table

    optimizers = list(curves)
    rows = []
    for row in fastest_by_devices(curves):
        cells = [row["points"][o].text() if o in row["points"] else "–" for o in optimizers]
        lead = f" ({row['lead']:.2f}x)" if row["lead"] else ""
        rows.append([str(row["devices"]), *cells, f"{row['fastest']}{lead}"])
    header = ["devices", *optimizers, "fastest (lead over the next)"]
    return [markdown_table(header, rows), ""]


def _plot(out_dir: Path, steps: Mapping[str, Mapping[int, float]], costs: StepCosts,
          curves: Mapping[str, list[FrontierPoint]], unshared: Mapping[str, list[FrontierPoint]]) -> bool:  # fmt: skip
    """Left: steps x step cost against the batch on one device; right: the frontier against the devices (dashed:
    K-FAC with every decomposition on every device, where that differs)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, optimizer in enumerate(curves):
        one = time_to_target(steps[optimizer], costs.on(optimizer, 1), 1)
        left.plot(sorted(one), [one[b] for b in sorted(one)], "o-", color=f"C{i}", label=optimizer)
        points = curves[optimizer]
        right.plot([p.devices for p in points], [p.seconds for p in points], "o-", color=f"C{i}", label=optimizer)
        for p in points:
            if p.used == p.devices:
                right.annotate(str(p.batch_size), (p.devices, p.seconds), fontsize=6, color=f"C{i}")
        if (alone := unshared.get(optimizer)) and alone != points:
            label = f"{optimizer}, every decomposition on every device"
            right.plot([p.devices for p in alone], [p.seconds for p in alone], "--", color=f"C{i}", label=label)
    for ax, xlabel, title in (
        (left, "batch size (one device)", "Steps to target × step cost"),
        (
            right,
            "devices P (labels: the best global batch; flat: more devices do not help)",
            "Fastest time to target with P devices",
        ),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds to target" + (" (with modelled communication)" if costs.communication else ""))
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / COST_PLOT, dpi=120)
    plt.close(fig)
    return True


def _spread_lines(measured: Mapping[str, Any]) -> list[str]:
    """How far the step costs moved between the benchmark's rounds: a lead smaller than that is not measured."""
    spreads = [r for by_batch in measured.get("max_over_min_of_rounds", {}).values() for r in by_batch.values()]
    if not spreads:
        return []
    return [
        f"A cell's step cost moved by up to {max(spreads):.2f}x between the benchmark's {measured.get('rounds')} "
        f"rounds (median {sorted(spreads)[len(spreads) // 2]:.2f}x; the table uses each cell's median over them): "
        "a lead smaller than that is within the machine's noise.",
        "",
    ]


def _sharing_lines(costs: StepCosts, curves: Mapping[str, list[FrontierPoint]],
                   unshared: Mapping[str, list[FrontierPoint]]) -> list[str]:  # fmt: skip
    """What sharing the decompositions out changes: their part of the step, and the frontier's largest gain."""
    lines = []
    for optimizer, parts in costs.decompositions.items():
        measured = costs.seconds.get(optimizer, {})
        shares = [parts[b] / measured[b] for b in parts if measured.get(b)]
        pairs = zip(unshared.get(optimizer, []), curves.get(optimizer, []), strict=True)  # the same device counts
        gains = [alone.seconds / shared.seconds for alone, shared in pairs]
        if not shares or not gains:
            continue
        largest = max(costs.speedup.values(), default=1.0)
        lines.append(
            f"{optimizer}'s decompositions are {min(shares):.0%}–{max(shares):.0%} of its step on one device; "
            f"distkfac shares them out up to {largest:.2f}x (the sum of their n^3 costs over the busiest rank's, "
            f"at {max(costs.speedup)} ranks). The frontier above charges them so; with every decomposition on "
            + (f"every device it would be up to {max(gains):.2f}x slower." if max(gains) >= 1.005 else
               "every device it would be the same, within 0.5%.")
        )  # fmt: skip
    return [" ".join(lines), ""] if lines else []


def _communication_lines(measured: Mapping[str, Any], costs: StepCosts, curves: Mapping[str, list[FrontierPoint]],
                         compute_only: Mapping[str, list[FrontierPoint]]) -> list[str]:  # fmt: skip
    """What the modelled communication is, how large at the largest P, and how much it slows the frontier."""
    if not any(costs.communication.values()):
        return []
    largest = max(max(by_devices) for by_devices in costs.communication.values() if by_devices)
    at_largest = ", ".join(
        f"{optimizer} {by_devices[largest] * 1e3:.2f} ms" for optimizer, by_devices in costs.communication.items()
    )
    slower = []
    for optimizer, points in curves.items():
        pairs = zip(compute_only.get(optimizer, []), points, strict=False)  # the same device counts
        ratio, devices = max(((p.seconds / c.seconds, p.devices) for c, p in pairs), default=(1.0, 1))
        slower.append(f"{optimizer} {ratio:.2f}x (P = {devices})")
    return [
        f"Communication is modelled, not measured (benchmarks/step_comm.py): each device's collectives per step on "
        f"{measured.get('network', 'the stated network')}, never overlapped with compute (an upper bound): the "
        "gradient allreduce, and for K-FAC also its factor reductions, checks, and decomposition and gradient "
        f"broadcasts as distkfac plans them. Per step at P = {largest}: {at_largest}. The frontier above includes it; "
        f"it makes each optimizer's frontier at most this much slower than compute alone: {', '.join(slower)}.",
        "",
    ]


def _own_time_note(own: Mapping[str, Mapping[int, OwnTime]]) -> str:
    paused = sum(time.paused for by_batch in own.values() for time in by_batch.values())
    counted = (
        f"; {paused} step(s) or evaluation(s) of these runs took over {PAUSED_FACTOR:g}x their run's median and "
        f"over {PAUSED_AFTER_S:g} s (a process stopped or a machine suspended, not work), and count at that median"
        if paused
        else ""
    )
    return (
        "The best run's own time to target is the sum of its training steps' and evaluations' times up to the target, "
        "as its metrics recorded them during the study, two runs at a time on this machine's cores, over every "
        f"attempt of a resumed run{counted}."
    )


def cost_section(
    out_dir: Path, steps: Mapping[str, Mapping[int, float]], own: Mapping[str, Mapping[int, OwnTime]]
) -> list[str]:
    """The report's "Cost" section from ``out_dir/step_cost.json``: per cell, and the frontier with its plot.
    ``steps``: steps to target by optimizer and batch size; ``own``: the best runs' own times to target."""
    lines = ["## Cost", ""]
    path = out_dir / STEP_COST_JSON
    if not path.is_file():
        return [*lines, "No step costs measured: run `python -m benchmarks.step_cost --config <the study file>` "
                "with nothing else running, then the study command again to redraw this report.", ""]  # fmt: skip
    costs = load_step_costs(path)
    measured = json.loads(path.read_text())
    curves, unshared = frontier(steps, costs), frontier(steps, costs, shared=False)
    compute_only = frontier(steps, costs, communicate=False)
    communication = (
        "Communication is modelled (below); evaluation and parallel inefficiency are left out"
        if any(costs.communication.values())
        else "Communication, evaluation and parallel inefficiency are left out (flattering the optimizer that "
        "communicates most, K-FAC)"
    )
    decompositions = (
        "K-FAC's decompositions are charged as distkfac shares them out among the devices (below)"
        if any(costs.decompositions.values())
        else "K-FAC's step cost includes all of its decompositions on every device, which distkfac shares out "
        "among the ranks (penalising K-FAC)"
    )
    lines += [
        f"Step costs from `{measured.get('command', '')}` ({measured.get('machine', '')}, "
        f"{measured.get('threads', '?')} thread(s), training steps only). Time to target on P devices = steps to "
        "target at global batch B × the step cost at local batch B / P, with idle devices allowed (study/cost.py). "
        f"{communication}; {decompositions}. {_own_time_note(own)}",
        "",
        *_cell_table(steps, costs, own),
        *_frontier_table(curves),
        *_spread_lines(measured),
        *_sharing_lines(costs, curves, unshared),
        *_communication_lines(measured, costs, curves, compute_only),
    ]
    if _plot(out_dir, steps, costs, curves, unshared):
        lines += [f"![cost frontier]({COST_PLOT})", ""]
    return lines
