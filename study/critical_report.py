"""The critical-batch sections of a tuned study's report: how sure it is (Uncertainty), the plain-word answers
(Answers, from :mod:`study.claims`) and the time to target (Cost, from :mod:`study.cost`).

All three read the repeats of each cell's best setting over seeds; :func:`summarise_repeats` resamples them once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from study.claims import TuningCount
from study.report import (
    MISSING,
    CellKey,
    SeriesKey,
    _by_cell,
    _fmt_int,
    _num,
    _optimizer_rank,
    _reached,
    _series_label,
    _sorted_keys,
    best_runs,
    markdown_table,
    read_metrics_file,
    run_hparams,
)
from study.uncertainty import Interval

if TYPE_CHECKING:  # hyperopt, which hpo_worker.spaces imports, only for tuned studies
    from hpo_worker.spaces import SearchSpace

MIN_REPEATS: Final = 2  # repeats that reached the target, for a cell's mean and its place in the S(B) fit
ANSWER_RULES: Final = (
    "Each claim is answered from the repeats' intervals (90%), by rules fixed before the runs (study/claims.py): "
    "two estimates differ only when their intervals do not overlap (a conservative test); B_crit ~ B_simple holds "
    "within a factor of 2 and is 'the same order' within 10; a cell enters the S(B) fit when two or more of its "
    "repeats reached the target, and a claim about an optimizer without a fit is inconclusive; a best trial in the "
    "outer 5% of a searched range (on its sampling scale) lies at an edge of the search space; 'no more robust to "
    "its hyperparameters' compares the share of tuning trials reaching the target over the three largest batch "
    "sizes, by Fisher's exact test at p < 0.1."
)


@dataclass(frozen=True)
class Repeats:
    """The repeats of each cell's best setting over seeds, summarised once for every section."""

    runs: dict[CellKey, list[Mapping[str, Any]]]  # every repeat, reached or not
    steps: dict[CellKey, list[float]]  # steps to target of those that reached it
    means: dict[CellKey, Interval]  # their geometric mean [90%], where two or more reached it
    fits: dict[SeriesKey, dict[str, Interval]]  # the S(B) fit's b_crit and s_min [90%], refitted to them resampled


def summarise_repeats(runs: Sequence[Mapping[str, Any]]) -> Repeats:
    """Bootstrap the repeats (``source == "repeat"``) of ``runs``: each cell's mean, and each series' fit where it
    has cells with two or more repeats that reached the target at two batch sizes or more."""
    from study.uncertainty import bootstrap_mean, fit_interval

    by_cell = _by_cell([r for r in runs if r.get("source") == "repeat"])
    steps = {
        key: [s for r in cell if _reached(r) and (s := _num(r.get("steps_to_target"))) is not None]
        for key, cell in by_cell.items()
    }
    series: dict[SeriesKey, dict[int, list[float]]] = {}
    for (variant, optimizer, batch), values in steps.items():
        if len(values) >= MIN_REPEATS:
            series.setdefault((variant, optimizer), {})[batch] = values
    return Repeats(
        runs=by_cell,
        steps=steps,
        means={key: bootstrap_mean(values) for key, values in steps.items() if len(values) >= MIN_REPEATS},
        fits={key: fit_interval(by_batch, resamples=500) for key, by_batch in series.items() if len(by_batch) >= 2},
    )


def _search_steps(tuned: Sequence[Mapping[str, Any]], stopped: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """A cell's steps to target in the order the search ran its trials; None where a trial missed (stopped
    trials, pruned or failed, count as misses)."""
    trials = [(_num(r.get("trial")) or 0.0, _num(r.get("steps_to_target")) if _reached(r) else None) for r in tuned]
    trials += [(_num(r.get("trial")) or 0.0, None) for r in stopped]
    return [value for _, value in sorted(trials, key=lambda t: t[0])]  # trial ids count up in search order


def _noise_scales(best: Mapping[CellKey, Mapping[str, Any]], series: SeriesKey) -> list[float]:
    """The best runs' final B_simple estimates of one series, over its batch sizes."""
    return [n for (v, o, _), run in best.items() if (v, o) == series and (n := _num(run.get("noise_scale")))]


# ------------------------------------------------------------------------------------------------------ uncertainty


def _cell_uncertainty(
    tuned: list[Mapping[str, Any]], stopped: list[Mapping[str, Any]], key: CellKey, repeats: Repeats
) -> list[str]:
    """One row of the uncertainty table: the search's best with its resampled interval, the first half's best, and
    the best setting's repeats over seeds. Stopped trials (pruned, diverged) count as trials that missed the
    target: the pruner is the objective's own early stop."""
    from study.uncertainty import bootstrap_best_of_trials, budget_halves

    steps = _search_steps(tuned, stopped)
    best = bootstrap_best_of_trials(steps).text() if steps else MISSING
    half = _fmt_int(budget_halves(steps)[0]) if len(steps) >= 2 else MISSING
    pruned = sum(r.get("status") == "pruned" for r in stopped)
    count = f"{len(steps)}: {len(tuned)} / {pruned} / {len(stopped) - pruned}"
    mean = repeats.means[key].text() if key in repeats.means else MISSING
    reached = f"{len(repeats.steps.get(key, []))}/{len(repeats.runs.get(key, []))}"
    return [count, best, half, mean, reached]


def _fit_uncertainty(repeats: Repeats, best: Mapping[CellKey, Mapping[str, Any]]) -> list[str]:
    """The S(B) fit's 90% intervals from the repeats of each series, beside the best runs' noise scales."""
    if not repeats.fits:
        return []
    rows = []
    for key in sorted({*repeats.fits, *((v, o) for v, o, _ in best)}, key=lambda k: _optimizer_rank(k[1])):
        scales = _noise_scales(best, key)
        noise = f"{min(scales):.4g} – {max(scales):.4g}" if scales else MISSING
        fit = repeats.fits.get(key)
        interval = [fit["b_crit"].text(), fit["s_min"].text()] if fit else [MISSING, MISSING]
        rows.append([_series_label(*key), *interval, noise])
    header = ["series", "B_crit [90%]", "S_min [90%]", "B_simple of the best runs (range over batch sizes)"]
    return [markdown_table(header, rows), "", *_missed_repeats_lines(repeats)]


def _missed_repeats_lines(repeats: Repeats) -> list[str]:
    """Where some repeats missed the target, the fit again with them counted, for every series alike: to each
    cell's median over all its repeats, a miss as never (the geometric means above are over the repeats that reached
    it, which is optimistic for a setting that fails on some seeds). A cell whose median is a miss is left out."""
    missed = {key: len(runs) - len(repeats.steps.get(key, [])) for key, runs in repeats.runs.items()}
    if not any(missed.values()):
        return []
    cells = sorted(repeats.runs, key=lambda k: (_optimizer_rank(k[1]), k))
    which = "; ".join(f"{_series_label(*k[:2])} at {k[2]} ({missed[k]} of {len(repeats.runs[k])})" for k in cells
                      if missed[k])  # fmt: skip
    lines = [
        f"Repeats that missed the target within the budget: {which}. The fit with them counted, for every series "
        "alike (S(B) fitted to each cell's median over all its repeats, a miss as never):"
    ]
    for series in dict.fromkeys(k[:2] for k in cells):
        medians = {k[2]: _median_counting_misses(repeats.steps.get(k, []), missed[k]) for k in cells if k[:2] == series}
        lines.append(f"- {_series_label(*series)}: {_median_fit_text(medians)}.")
    return [*lines, ""]


def mostly_missed(reached: int, ran: int) -> bool:
    """Whether a cell's repeats mostly missed the target: its median over all of them, a miss counted as never, is
    a miss. So exactly half missed counts too (an even count's median then averages a finite value with never). The
    one rule for both the fit to the medians and the cost frontier."""
    return 2 * reached <= ran


def _median_counting_misses(steps: Sequence[float], misses: int) -> float:
    if mostly_missed(len(steps), len(steps) + misses):
        return math.inf
    return statistics.median([*steps, *[math.inf] * misses])


def _median_fit_text(medians: Mapping[int, float]) -> str:
    from study.fit import fit_steps_to_target

    kept = sorted(b for b, m in medians.items() if math.isfinite(m))
    left = sorted(set(medians) - set(kept))
    if len(kept) < 2:
        return "too few cells to fit"
    fit = fit_steps_to_target(kept, [medians[b] for b in kept])
    note = f" (left out, most repeats missed: batch {', '.join(map(str, left))})" if left else ""
    return f"B_crit {fit.b_crit:.0f}, S_min {fit.s_min:.0f}{note}"


def uncertainty_section(
    runs: Sequence[Mapping[str, Any]], stopped: Sequence[Mapping[str, Any]], repeats: Repeats
) -> list[str]:
    """How sure the study is (study.uncertainty): per cell, the search and the seed; per series, the fit."""
    tuned = _by_cell([r for r in runs if r.get("source") == "tuned"])
    halted = _by_cell(stopped)
    if not tuned and not halted:
        return []
    rows = []
    for key in _sorted_keys({*tuned, *halted}):
        cell = _cell_uncertainty(tuned.get(key, []), halted.get(key, []), key, repeats)
        rows.append([_series_label(key[0], key[1]), str(key[2]), *cell])
    header = ["series", "batch", "trials: finished / pruned / failed", "best steps [resampled trials, 90%]",
              "best of the first half",
              "repeats: steps, geometric mean [90%]", "repeats reached"]  # fmt: skip
    lines = [
        "## Uncertainty",
        "",
        "The best steps to target of the search, with the 90% range of the best over the trials resampled with "
        "replacement (the spread of the search; biased towards the observed best; ∞: no trial of the resample "
        "reached the target), and the best of the first half of the trials (equal to the best: the second half of "
        "the budget found nothing better). Pruned and failed (diverged) trials count as trials that did not reach "
        "the target: the pruner is the objective's own early stop, and a setting that diverges is a miss (a trial "
        "stopped behind an earlier trial's best might have reached the target later: the range's upper end is "
        "conservative). "
        "Repeats: the best trial trained again with other seeds, the geometric mean of their steps to target with "
        "its expanded percentile bootstrap interval. The fit: S(B) refitted to the repeats resampled cell by cell.",
        "",
        markdown_table(header, rows),
        "",
    ]
    return lines + _fit_uncertainty(repeats, best_runs(runs))


# ---------------------------------------------------------------------------------------------------------- answers


def _claim_inputs(
    runs: Sequence[Mapping[str, Any]], stopped: Sequence[Mapping[str, Any]], repeats: Repeats
) -> dict[str, Any]:
    """Per optimizer: the repeats' geometric means by batch size (means), the tuning trials (counts) and the two
    halves of the search (halves) by batch size, and the batch sizes whose best run reached the target (reached)."""
    from study.uncertainty import budget_halves

    means: dict[str, dict[int, Interval]] = {}
    for (_, optimizer, batch), mean in repeats.means.items():
        means.setdefault(optimizer, {})[batch] = mean
    tuned = _by_cell([r for r in runs if r.get("source") == "tuned"])
    halted = _by_cell(stopped)
    counts: dict[str, dict[int, TuningCount]] = {}
    halves: dict[str, dict[int, tuple[float, float]]] = {}
    for key in _sorted_keys({*tuned, *halted}):
        cell, steps = tuned.get(key, []), _search_steps(tuned.get(key, []), halted.get(key, []))
        counts.setdefault(key[1], {})[key[2]] = TuningCount(len(steps), sum(_reached(r) for r in cell))
        if len(steps) >= 2:
            halves.setdefault(key[1], {})[key[2]] = budget_halves(steps)
    reached: dict[str, list[int]] = {}
    for (_, optimizer, batch), run in best_runs(runs).items():
        if _reached(run):
            reached.setdefault(optimizer, []).append(batch)
    return {"means": means, "counts": counts, "reached": reached, "halves": halves}


def _best_trial_edges(
    runs: Sequence[Mapping[str, Any]], spaces: Mapping[str, SearchSpace]
) -> dict[str, dict[int, list[str]]]:
    """Per optimizer and batch size, the values of the cell's best tuning trial that lie at an edge of their
    searched range (study.claims.EDGE_WITHIN); cells whose best trial missed the target are left out."""
    from study.claims import EDGE_WITHIN

    edges: dict[str, dict[int, list[str]]] = {}
    for (_, optimizer, batch), run in best_runs([r for r in runs if r.get("source") == "tuned"]).items():
        if optimizer in spaces and _reached(run):
            edges.setdefault(optimizer, {})[batch] = spaces[optimizer].edges(run_hparams(run), EDGE_WITHIN)
    return edges


def answers_section(
    runs: Sequence[Mapping[str, Any]],
    stopped: Sequence[Mapping[str, Any]],
    repeats: Repeats,
    spaces: Mapping[str, SearchSpace] | None = None,
) -> list[str]:
    """The critical-batch question in plain words (study.claims), for a study of one variant with repeats;
    ``spaces`` (each optimizer's search space) adds whether the best trials lie at an edge of them."""
    from study.claims import answers

    if not repeats.fits or any(variant for variant, _ in repeats.fits):
        return []
    best = best_runs(runs)
    studied = {optimizer for variant, optimizer, _ in repeats.runs if not variant}
    grouped = answers(
        b_crit={optimizer: fit["b_crit"] for (_, optimizer), fit in repeats.fits.items()},
        b_simple={o: _noise_scales(best, ("", o)) for (_, o) in repeats.fits},
        batches=sorted({int(r["batch_size"]) for r in runs}),
        edges=_best_trial_edges(runs, spaces) if spaces else None,
        unfitted=sorted(studied - {optimizer for _, optimizer in repeats.fits}, key=_optimizer_rank),
        **_claim_inputs(runs, stopped, repeats),
    )
    lines = ["## Answers", "", ANSWER_RULES, ""]
    for heading, verdicts in grouped.items():
        lines += [f"### {heading}", "", *(v.line() for v in verdicts), ""]
    return lines


# ------------------------------------------------------------------------------------------------------------- cost


def cost_lines(out_dir: Path, runs: Sequence[Mapping[str, Any]], repeats: Repeats) -> list[str]:
    """The "Cost" section (study.cost) of a tuned study of one variant: steps to target are the repeats' geometric
    mean where two or more reached it, else the best run's; a cell whose repeats mostly missed the target is left
    out (its setting does not reliably reach it), as from the fit to the medians, and named."""
    from study.cost import STEP_COST_JSON, OwnTime, cost_section, own_time_to_target

    best = best_runs(runs)
    if not any(r.get("source") == "tuned" for r in runs) or any(variant for variant, _, _ in best):
        return []
    steps: dict[str, dict[int, float]] = {}
    own: dict[str, dict[int, OwnTime]] = {}
    for (_, optimizer, batch), run in best.items():
        if not _reached(run) or not (s := _num(run.get("steps_to_target"))):
            continue
        steps.setdefault(optimizer, {})[batch] = s
        if (time := own_time_to_target(read_metrics_file(run.get("metrics_path") or ""), s)) is not None:
            own.setdefault(optimizer, {})[batch] = time
    for (_, optimizer, batch), mean in repeats.means.items():
        steps.setdefault(optimizer, {})[batch] = mean.estimate
    missed = [key for key, ran in repeats.runs.items() if mostly_missed(len(repeats.steps.get(key, [])), len(ran))]
    left_out = [(v, o, b) for v, o, b in missed if steps.get(o, {}).pop(b, None) is not None]
    for _, optimizer, batch in left_out:
        own.get(optimizer, {}).pop(batch, None)
    section = cost_section(out_dir, steps, own)
    if left_out and (out_dir / STEP_COST_JSON).is_file():  # the section has numbers
        named = "; ".join(f"{_series_label(v, o)} at {b}" for v, o, b in _sorted_keys(left_out))
        section += [f"Left out, because most of their repeats missed the target: {named}.", ""]
    return section
