"""The critical-batch question answered in plain words, claim by claim, from a study's intervals (issue 20).

Every answer is one :class:`Verdict`: the claim, agree / disagree / inconclusive (or yes / no / inconclusive for
the study's own questions), and the numbers it rests on. The rules are fixed here, before any result, and written
into the report:

- **Two estimates differ** only when their 90% intervals do not overlap (:func:`compare`). Non-overlap of two 90%
  intervals is a conservative test (about the 1% level for equal widths); overlap is reported as inconclusive, not
  as equality.
- **B_crit ~ B_simple** (McCandlish et al. 2018) holds when the ratio B_crit / B_simple is within a factor of 2
  (our tolerance: the paper calls B_simple a prediction "within an order of magnitude" at worst), is "the same
  order" within a factor of 10, and fails beyond. B_simple is the geometric mean of the best runs' final estimates
  over the batch sizes.
- **The search budget is large enough** (Shallue et al. 2019) when, in every cell, the best of the first half of
  the trials is within 10% of the best of all (:data:`STABLE_WITHIN`); the cells where it is not are named.
- **The search spaces are wide enough** when no cell's best trial lies within 5% of an end of a searched range, on
  the scale it is sampled on (:data:`EDGE_WITHIN`, our tolerance). The Deep Learning Tuning Playbook (Godbole,
  Dahl, Gilmer, Shallue and Nado 2023) asks the same of a search: best trials near a boundary mean that a wider
  space may hold better ones. The cells and values at an edge are named.
- **Too few repeats.** A cell enters the S(B) fit only when at least two of its repeats reached the target, and a
  series is fitted only with two such cells or more; a claim about an optimizer without a fit is inconclusive, and
  says so (interim reports, drawn while the repeats run).
- **No more robust to its hyperparameters** (Ma et al. 2020) compares the share of tuning trials that reached the
  target, pooled over the three largest batch sizes, with SGD's, by Fisher's exact test at p < 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from study.uncertainty import Interval, geometric_mean

__all__ = [
    "TuningCount",
    "Verdict",
    "answers",
    "budget_stable",
    "compare",
    "critical_vs_noise",
    "largest_critical_batch",
    "no_more_robust",
    "search_space_edges",
    "steps_at_largest_batch",
]

T = TypeVar("T")
AGREE, DISAGREE, INCONCLUSIVE = "agree", "disagree", "inconclusive"
NOISE_CLOSE: Final = 2.0  # B_crit / B_simple within this factor: "holds"
NOISE_ORDER: Final = 10.0  # within this factor: "the same order of magnitude"
TUNING_P: Final = 0.1  # Fisher's exact test level for "no more robust to its hyperparameters"
STABLE_WITHIN: Final = 1.1  # the first half's best within 10% of the whole budget's best: the budget was enough
EDGE_WITHIN: Final = 0.05  # a best value in the outer 5% of its searched range (sampling scale) is at an edge
LABELS: Final = {"sgd": "SGD", "adam": "Adam", "kfac": "K-FAC"}


@dataclass(frozen=True)
class Verdict:
    """One claim, its verdict and the numbers behind it."""

    claim: str
    verdict: str
    evidence: str

    def line(self) -> str:
        return f"- **{self.claim}** {self.verdict.capitalize()}. {self.evidence}"


@dataclass(frozen=True)
class TuningCount:
    """A cell's tuning trials: how many ran, and how many reached the target."""

    trials: int
    reached: int


def _label(optimizer: str) -> str:
    return LABELS.get(optimizer, optimizer)


def compare(a: Interval, b: Interval) -> int:
    """+1 when ``a`` lies above ``b`` beyond their intervals, -1 below, 0 when the intervals overlap."""
    if a.low > b.high:
        return 1
    if a.high < b.low:
        return -1
    return 0


def _too_few(optimizers: Sequence[str]) -> str:
    """Why a claim about ``optimizers`` (those without an S(B) fit) cannot be answered yet."""
    names = ", ".join(_label(o) for o in optimizers)
    return f"No fit for {names}: too few repeats (fewer than two cells where two or more reached the target)."


def largest_critical_batch(b_crit: Mapping[str, Interval], unfitted: Sequence[str] = ()) -> Verdict:
    """Which optimizer has the largest B_crit: clear when its interval lies above every other's and every
    optimizer studied has a fit (``unfitted``: those with too few repeats for one)."""
    ranked = sorted(b_crit, key=lambda o: b_crit[o].estimate, reverse=True)
    listing = ", ".join(f"{_label(o)} {b_crit[o].text()}" for o in ranked)
    if len(ranked) < 2 or unfitted:
        reason = f"{_too_few(unfitted)} " if unfitted else ""
        return Verdict(
            "Which optimizer has the largest critical batch?", INCONCLUSIVE, f"{reason}Fits: {listing or 'none'}."
        )
    top, rest = ranked[0], ranked[1:]
    overlapping = [o for o in rest if compare(b_crit[top], b_crit[o]) == 0]
    if not overlapping:
        return Verdict("Which optimizer has the largest critical batch?", _label(top), f"B_crit [90%]: {listing}.")
    return Verdict(
        "Which optimizer has the largest critical batch?",
        INCONCLUSIVE,
        f"{_label(top)} has the largest estimate, but its interval overlaps "
        f"{', '.join(_label(o) for o in overlapping)}'s. B_crit [90%]: {listing}.",
    )


def steps_at_largest_batch(means: Mapping[str, Mapping[int, Interval]], subject: str = "kfac") -> list[Verdict]:
    """Whether ``subject`` needs fewer steps than each other optimizer at the largest batch size where all of them
    have an interval (the geometric mean of the repeats)."""
    common = set.intersection(*(set(by_batch) for by_batch in means.values())) if means else set()
    if subject not in means or len(means) < 2 or not common:
        return []
    batch = max(common)
    mine = means[subject][batch]
    verdicts = []
    for other in (o for o in means if o != subject):
        theirs = means[other][batch]
        side = compare(mine, theirs)
        verdict = {-1: "yes", 1: "no (it needs more)", 0: INCONCLUSIVE}[side]
        verdicts.append(
            Verdict(
                f"Does {_label(subject)} need fewer steps than {_label(other)} at batch {batch}, beyond the intervals?",
                verdict,
                f"Steps to target, geometric mean of the repeats [90%]: {_label(subject)} {mine.text()}, "
                f"{_label(other)} {theirs.text()} (ratio {mine.estimate / theirs.estimate:.2f}).",
            )
        )
    return verdicts


def critical_vs_noise(b_crit: Mapping[str, Interval], b_simple: Mapping[str, Sequence[float]]) -> list[Verdict]:
    """McCandlish et al.'s B_crit ~ B_simple, per optimizer (:data:`NOISE_CLOSE`, :data:`NOISE_ORDER`)."""
    verdicts = []
    for optimizer, interval in b_crit.items():
        scales = [s for s in b_simple.get(optimizer, ()) if s > 0]
        if not scales:
            continue
        noise = geometric_mean(scales)
        ratio = interval.estimate / noise
        far = max(ratio, 1 / ratio)
        verdict = AGREE if far <= NOISE_CLOSE else (INCONCLUSIVE if far <= NOISE_ORDER else DISAGREE)
        degree = {AGREE: "within 2x", INCONCLUSIVE: "the same order of magnitude only", DISAGREE: "beyond 10x"}
        verdicts.append(
            Verdict(
                f"B_crit ~ B_simple for {_label(optimizer)} (McCandlish et al. 2018)?",
                verdict,
                f"B_crit {interval.text()} against B_simple {noise:.0f} (geometric mean of the best runs' final "
                f"estimates, range {min(scales):.0f}–{max(scales):.0f}): ratio {ratio:.2f}, {degree[verdict]}.",
            )
        )
    return verdicts


def no_more_robust(counts: Mapping[str, Mapping[int, TuningCount]], subject: str = "kfac") -> list[Verdict]:
    """Ma et al. 2020: ``subject`` is no more robust to its hyperparameters than SGD at large batch ("similar
    hyperparameter sensitivity", with more hyperparameters to tune). Read as the share of tuning trials that
    reached the target over the three largest batch sizes, against SGD's, by Fisher's exact test: a significantly
    smaller share agrees, a larger one disagrees, no significant difference is inconclusive (consistent with
    "similar", not a proof of it)."""
    from scipy import stats  # the study extra, as study/fit.py

    if subject not in counts or "sgd" not in counts:
        return []
    largest = sorted(set(counts[subject]) & set(counts["sgd"]))[-3:]
    pooled = {
        o: (sum(counts[o][b].reached for b in largest), sum(counts[o][b].trials for b in largest))
        for o in (subject, "sgd")
    }
    (mine, my_trials), (sgd, sgd_trials) = pooled[subject], pooled["sgd"]
    if not my_trials or not sgd_trials:
        return []
    p_value = float(stats.fisher_exact([[mine, my_trials - mine], [sgd, sgd_trials - sgd]]).pvalue)
    share, sgd_share = mine / my_trials, sgd / sgd_trials
    verdict = INCONCLUSIVE if p_value >= TUNING_P else (AGREE if share < sgd_share else DISAGREE)
    caveat = " (no significant difference: consistent with similar sensitivity, not a proof of it)"
    return [
        Verdict(
            f"{_label(subject)} is no more robust to its hyperparameters than SGD at large batch (Ma et al. 2020)?",
            verdict,
            f"Tuning trials that reached the target at batch {', '.join(map(str, largest))}: {_label(subject)} "
            f"{mine}/{my_trials} ({share:.0%}), SGD {sgd}/{sgd_trials} ({sgd_share:.0%}); Fisher's exact test "
            f"p = {p_value:.3f}{caveat if verdict == INCONCLUSIVE else ''}.",
        )
    ]


def budget_stable(halves: Mapping[str, Mapping[int, tuple[float, float]]]) -> Verdict:
    """Whether the second half of every cell's trial budget found nothing more than 10% better than the first half
    (``halves``: per optimizer and batch size, the first half's best and the whole budget's best steps)."""

    def moved_by(first: float, best: float) -> str | None:
        if not math.isfinite(best) or first <= STABLE_WITHIN * best:
            return None
        return f"{'none' if math.isinf(first) else f'{first:.0f}'} → {best:.0f}"

    moved = _flagged_cells(halves, lambda half: moved_by(*half))
    cells = sum(len(by_batch) for by_batch in halves.values())
    return _cells_verdict(
        "Is each cell's trial budget large enough (the best stable between the two halves of the budget)?",
        moved,
        cells,
        f"In all {cells} cells the first half's best is within 10% of the best.",
        f"In {len(moved)} of {cells} cells the second half improved the best by more than 10% (first half → all): "
        f"{'; '.join(moved)}. There the best is less certain; the repeats' intervals carry the seed's part only.",
    )


def _flagged_cells(table: Mapping[str, Mapping[int, T]], flag: Callable[[T], str | None]) -> list[str]:
    """``"K-FAC/32: <what flag says>"`` for each cell (optimizer, batch size) of ``table`` that ``flag`` names."""
    return [
        f"{_label(optimizer)}/{batch}: {text}"
        for optimizer, by_batch in table.items()
        for batch, entry in sorted(by_batch.items())
        if (text := flag(entry)) is not None
    ]


def _cells_verdict(claim: str, flagged: Sequence[str], cells: int, none_flagged: str, evidence: str) -> Verdict:
    """A check of every cell: yes when none is ``flagged``, "mostly" when at most a quarter are, else no."""
    if not flagged:
        return Verdict(claim, "yes", none_flagged)
    return Verdict(claim, "no" if len(flagged) > cells // 4 else "mostly", evidence)


def search_space_edges(edges: Mapping[str, Mapping[int, Sequence[str]]]) -> Verdict:
    """Whether every cell's best trial lies inside its search space (``edges``: per optimizer and batch size, the
    best trial's values within :data:`EDGE_WITHIN` of an end of their range, from ``SearchSpace.edges``)."""
    at_edge = _flagged_cells(edges, lambda found: ", ".join(found) or None)
    cells = sum(len(by_batch) for by_batch in edges.values())
    return _cells_verdict(
        "Do the search spaces hold each cell's best inside them (not in the outer 5% of a range)?",
        at_edge,
        cells,
        f"In all {cells} cells the best trial's values are inside their ranges.",
        f"In {len(at_edge)} of {cells} cells the best trial lies at an edge: {'; '.join(at_edge)}. A wider range "
        "might hold a better setting there, as a larger budget might.",
    )


def _against_sgd(claim: str, optimizer: str, b_crit: Mapping[str, Interval], unfitted: Sequence[str]) -> Verdict | None:
    """The inconclusive verdict when ``optimizer`` or SGD has too few repeats for a fit; None otherwise."""
    missing = [o for o in (optimizer, "sgd") if o in unfitted]
    if missing:
        return Verdict(claim, INCONCLUSIVE, _too_few(missing))
    return None


def _zhang(b_crit: Mapping[str, Interval], unfitted: Sequence[str] = ()) -> list[Verdict]:
    """Zhang et al. 2019: preconditioning (K-FAC, Adam) extends perfect scaling beyond momentum SGD's."""
    verdicts = []
    for optimizer in ("kfac", "adam"):
        claim = f"{_label(optimizer)}'s critical batch is larger than SGD's (Zhang et al. 2019)?"
        if (short := _against_sgd(claim, optimizer, b_crit, unfitted)) is not None:
            verdicts.append(short)
        if optimizer not in b_crit or "sgd" not in b_crit:
            continue
        side = compare(b_crit[optimizer], b_crit["sgd"])
        verdicts.append(
            Verdict(
                claim,
                {1: AGREE, -1: DISAGREE, 0: INCONCLUSIVE}[side],
                f"B_crit [90%]: {_label(optimizer)} {b_crit[optimizer].text()}, SGD {b_crit['sgd'].text()}.",
            )
        )
    return verdicts


def _ma(b_crit: Mapping[str, Interval], unfitted: Sequence[str] = ()) -> list[Verdict]:
    """Ma et al. 2020: K-FAC's critical batch is no larger than SGD's."""
    claim = "K-FAC's critical batch is no larger than SGD's (Ma et al. 2020)?"
    if (short := _against_sgd(claim, "kfac", b_crit, unfitted)) is not None:
        return [short]
    if "sgd" not in b_crit or "kfac" not in b_crit:
        return []
    side = compare(b_crit["kfac"], b_crit["sgd"])
    evidence = f"B_crit [90%]: K-FAC {b_crit['kfac'].text()}, SGD {b_crit['sgd'].text()}."
    if side == 0:
        evidence += " The intervals overlap: not rejected, and not shown either."
    return [Verdict(claim, {1: DISAGREE, -1: AGREE, 0: INCONCLUSIVE}[side], evidence)]


def _seed_002(reached: Mapping[str, Sequence[int]], batches: Sequence[int]) -> Verdict:
    """Seed 002 (Naganuma et al.): K-FAC's best validation accuracy falls faster with the batch than SGD's. A
    steps-to-target study stops its runs at the target, so it does not measure the best accuracy."""
    missed = {o: [b for b in batches if b not in reached.get(o, ())] for o in ("kfac", "sgd")}
    where = "; ".join(
        f"{_label(o)} reached it at every batch size" if not m else f"{_label(o)} missed it at batch {m}"
        for o, m in missed.items()
    )
    return Verdict(
        "K-FAC's best validation accuracy falls faster with the batch than SGD's (seed 002)?",
        INCONCLUSIVE,
        "Not measured by this protocol: runs stop at the target, so the best accuracy of a fixed budget is not "
        f"recorded. What it does show about the target accuracy itself: {where}.",
    )


def answers(
    b_crit: Mapping[str, Interval],
    means: Mapping[str, Mapping[int, Interval]],
    b_simple: Mapping[str, Sequence[float]],
    counts: Mapping[str, Mapping[int, TuningCount]],
    reached: Mapping[str, Sequence[int]],
    batches: Sequence[int],
    halves: Mapping[str, Mapping[int, tuple[float, float]]],
    edges: Mapping[str, Mapping[int, Sequence[str]]] | None = None,
    unfitted: Sequence[str] = (),
) -> dict[str, list[Verdict]]:
    """Every verdict, grouped under the questions of issue 20 and the papers they test (``edges``: None where the
    search spaces are not known, as for a study of given values; ``unfitted``: the optimizers with repeats but too
    few for an S(B) fit)."""
    return {
        "The study's questions": [
            budget_stable(halves),
            *([search_space_edges(edges)] if edges else []),
            largest_critical_batch(b_crit, unfitted),
            *steps_at_largest_batch(means),
            *critical_vs_noise(b_crit, b_simple),
        ],
        "Zhang et al. 2019 (NeurIPS), noisy quadratic model and real workloads": _zhang(b_crit, unfitted),
        "Ma et al. 2020 (AAAI), inefficiency of K-FAC at large batch": [
            *_ma(b_crit, unfitted),
            *no_more_robust(counts),
        ],
        "Seed 002 (Naganuma et al.), K-FAC's accuracy at large batch": [_seed_002(reached, batches)],
    }
