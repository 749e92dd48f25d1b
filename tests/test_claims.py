"""The plain-word answers of a critical-batch study (study.claims): each rule gives agree, disagree or
inconclusive from the intervals, the way the module's docstring fixes it."""

from __future__ import annotations

import math

from study.claims import (
    TuningCount,
    answers,
    budget_stable,
    compare,
    critical_vs_noise,
    largest_critical_batch,
    no_more_robust,
    search_space_edges,
    steps_at_largest_batch,
)
from study.uncertainty import Interval


def _iv(estimate: float, low: float, high: float) -> Interval:
    return Interval(estimate, low, high, 0.9)


def test_two_estimates_differ_only_when_their_intervals_do_not_overlap() -> None:
    assert compare(_iv(10, 9, 11), _iv(5, 4, 6)) == 1
    assert compare(_iv(5, 4, 6), _iv(10, 9, 11)) == -1
    assert compare(_iv(10, 6, 11), _iv(5, 4, 6.5)) == 0


def test_largest_critical_batch_names_a_winner_only_beyond_every_interval() -> None:
    clear = largest_critical_batch(
        {"sgd": _iv(900, 850, 1000), "kfac": _iv(2000, 1500, 2600), "adam": _iv(800, 700, 900)}
    )
    assert clear.verdict == "K-FAC" and "K-FAC 2000 [1500, 2600], SGD 900 [850, 1000]" in clear.evidence
    close = largest_critical_batch({"sgd": _iv(900, 850, 1100), "kfac": _iv(1200, 1000, 1600)})
    assert close.verdict == "inconclusive" and "overlaps SGD's" in close.evidence


def test_steps_at_the_largest_batch_every_optimizer_reached() -> None:
    means = {
        "kfac": {4096: _iv(30, 25, 35), 8192: _iv(35, 20, 57)},
        "sgd": {4096: _iv(70, 63, 77), 8192: _iv(64, 60, 68)},
        "adam": {4096: _iv(68, 63, 74)},  # no repeats reached at 8192: the comparison moves to 4096
    }
    verdicts = steps_at_largest_batch(means)
    assert [v.verdict for v in verdicts] == ["yes", "yes"]
    assert all("at batch 4096" in v.claim for v in verdicts)
    worse = steps_at_largest_batch({"kfac": {512: _iv(90, 80, 100)}, "sgd": {512: _iv(50, 45, 55)}})
    assert worse[0].verdict == "no (it needs more)" and "ratio 1.80" in worse[0].evidence
    assert steps_at_largest_batch({"sgd": {512: _iv(50, 45, 55)}}) == []


def test_critical_batch_against_the_noise_scale_within_2x_10x_or_beyond() -> None:
    b_crit = {"sgd": _iv(1000, 900, 1100), "adam": _iv(1000, 900, 1100), "kfac": _iv(1000, 900, 1100)}
    scales = {"sgd": [400.0, 1000.0], "adam": [100.0, 400.0], "kfac": [20.0, 50.0]}  # geometric means 632, 200, 32
    verdicts = {v.claim.split(" for ")[1].split(" ")[0]: v for v in critical_vs_noise(b_crit, scales)}
    assert verdicts["SGD"].verdict == "agree" and "ratio 1.58" in verdicts["SGD"].evidence
    assert verdicts["Adam"].verdict == "inconclusive" and "ratio 5.00" in verdicts["Adam"].evidence
    assert verdicts["K-FAC"].verdict == "disagree"


def test_no_more_robust_than_sgd_needs_a_significant_difference_over_the_largest_batches() -> None:
    few = {b: TuningCount(20, 2) for b in (512, 1024, 2048, 4096)}
    many = {b: TuningCount(20, 12) for b in (512, 1024, 2048, 4096)}
    (agree,) = no_more_robust({"kfac": few, "sgd": many})
    assert agree.verdict == "agree" and "K-FAC 6/60 (10%), SGD 36/60 (60%)" in agree.evidence
    assert "batch 1024, 2048, 4096" in agree.evidence  # the three largest only
    (disagree,) = no_more_robust({"kfac": many, "sgd": few})
    assert disagree.verdict == "disagree"
    (same,) = no_more_robust({"kfac": few, "sgd": {b: TuningCount(20, 3) for b in few}})
    assert same.verdict == "inconclusive" and "consistent with similar sensitivity, not a proof" in same.evidence


def test_budget_stability_names_the_cells_whose_second_half_found_better() -> None:
    stable = budget_stable({"sgd": {32: (1050.0, 1000.0), 64: (500.0, 500.0)}})
    assert stable.verdict == "yes" and "all 2 cells" in stable.evidence
    moved = budget_stable({"sgd": {32: (1500.0, 1000.0), 64: (500.0, 500.0)}, "kfac": {32: (math.inf, 700.0)}})
    assert (
        moved.verdict == "no" and "SGD/32: 1500 → 1000" in moved.evidence and "K-FAC/32: none → 700" in moved.evidence
    )


def test_search_space_edges_name_the_cells_whose_best_lies_at_an_edge() -> None:
    inside = search_space_edges({"sgd": {32: [], 64: []}, "kfac": {32: []}})
    assert inside.verdict == "yes" and "all 3 cells" in inside.evidence
    one: dict[str, dict[int, list[str]]] = {
        "sgd": {b: [] for b in (32, 64, 128, 256)}, "kfac": {32: ["optim.lr 0.00105 at the low end (0.001 – 3)"]},
    }  # fmt: skip
    mostly = search_space_edges(one)
    assert mostly.verdict == "mostly" and "In 1 of 5 cells" in mostly.evidence
    assert "K-FAC/32: optim.lr 0.00105 at the low end (0.001 – 3)" in mostly.evidence
    many = search_space_edges({"adam": {32: ["optim.betas 0.52 at the low end (0.5 – 0.99)"], 64: ["x"], 128: []}})
    assert many.verdict == "no" and "Adam/32" in many.evidence and "Adam/128" not in many.evidence


def test_answers_group_every_claim_under_its_source() -> None:
    b_crit = {"sgd": _iv(900, 850, 1000), "kfac": _iv(2000, 1500, 2600), "adam": _iv(1900, 1400, 2500)}
    grouped = answers(
        b_crit=b_crit,
        means={o: {8192: _iv(40, 35, 45)} for o in b_crit},
        b_simple={o: [800.0] for o in b_crit},
        counts={o: {8192: TuningCount(20, 5)} for o in b_crit},
        reached={"sgd": [32, 8192], "kfac": [8192]},
        batches=[32, 8192],
        halves={o: {8192: (40.0, 40.0)} for o in b_crit},
    )
    zhang = grouped["Zhang et al. 2019 (NeurIPS), noisy quadratic model and real workloads"]
    assert [v.verdict for v in zhang] == ["agree", "agree"]
    ma = grouped["Ma et al. 2020 (AAAI), inefficiency of K-FAC at large batch"]
    assert ma[0].verdict == "disagree" and ma[1].verdict == "inconclusive"
    assert not any("search spaces" in v.claim for v in grouped["The study's questions"])  # no spaces given
    (seed,) = grouped["Seed 002 (Naganuma et al.), K-FAC's accuracy at large batch"]
    assert seed.verdict == "inconclusive" and "K-FAC missed it at batch [32]" in seed.evidence
    assert seed.line().startswith("- **K-FAC's best validation accuracy falls faster")


def test_an_optimizer_with_too_few_repeats_for_a_fit_leaves_its_claims_inconclusive() -> None:
    """While the repeats run (an interim report), K-FAC may have no S(B) fit yet: the claims that compare its
    B_crit are inconclusive and say why, whatever the others' fits say; those without it are answered as usual."""
    b_crit = {"sgd": _iv(900, 850, 1000), "adam": _iv(2000, 1500, 2600)}
    grouped = answers(
        b_crit=b_crit,
        means={},
        b_simple={},
        counts={},
        reached={},
        batches=[32, 8192],
        halves={o: {8192: (40.0, 40.0)} for o in b_crit},
        unfitted=["kfac"],
    )
    largest = next(v for v in grouped["The study's questions"] if "largest critical batch" in v.claim)
    assert largest.verdict == "inconclusive" and largest.evidence.startswith("No fit for K-FAC: too few repeats")
    zhang = {
        v.claim.split("'s")[0]: v
        for v in grouped["Zhang et al. 2019 (NeurIPS), noisy quadratic model and real workloads"]
    }
    assert zhang["K-FAC"].verdict == "inconclusive" and "No fit for K-FAC" in zhang["K-FAC"].evidence
    assert zhang["Adam"].verdict == "agree"  # Adam's interval lies above SGD's
    (ma,) = grouped["Ma et al. 2020 (AAAI), inefficiency of K-FAC at large batch"]
    assert ma.verdict == "inconclusive" and "No fit for K-FAC" in ma.evidence
    assert largest_critical_batch(b_crit).verdict == "Adam"  # with every optimizer fitted, the same fits decide
