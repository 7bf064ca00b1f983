"""The comparison report from hand-made per-seed records (docs/DESIGN.md §3.2; recbole_popprior/compare_report.py)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from scipy import stats

from recbole_popprior.compare_report import delta_cell, p_cell, seed_cell, specificity_lines, summarise

STILL_DIR = "still carries a significant popularity direction"
STILL_SHARED = "still carries significant context-shared popularity energy"
STD_NONE = "the standard arm shows no significant"


def _spec(p_dir, p_shared):
    return {"label": "x", "p_value": p_cell(p_dir), "p_value_shared": p_cell(p_shared)}


@pytest.mark.parametrize("p_dir, p_shared", list(itertools.product([0.001, 0.05, 0.3], repeat=2)))
def test_specificity_sentence_appears_exactly_when_the_p_values_say_so(p_dir, p_shared) -> None:
    alpha = 0.05
    lines = specificity_lines({"standard": _spec([p_dir], [p_shared]), "separated": _spec([p_dir], [p_shared])},
                              alpha)
    std, sep = lines
    assert std.startswith("- ") and sep.startswith("- ")
    assert (STD_NONE in std) == (p_dir > alpha or p_shared > alpha)
    assert ("as expected" in std) == (p_dir <= alpha and p_shared <= alpha)
    assert (STILL_DIR in sep) == (p_dir <= alpha)
    assert (STILL_SHARED in sep) == (p_dir > alpha and p_shared <= alpha)
    assert ("carries no significant popularity direction" in sep) == (p_dir > alpha and p_shared > alpha)
    assert f"p = {p_dir:#.2g} for dir_frac" in sep  # two significant figures, trailing zeros kept


def _record(seed: int, rng: np.random.Generator, p_sep: float) -> dict:
    """One seed of a two-arm comparison, with made-up numbers."""
    rows = ("standard", "separated", "separated_beta0")
    metrics = {row: {f"{m}@10": float(rng.uniform(0.1, 0.9)) for m in
                     ("ndcg", "recall", "mrr", "headrecall", "midrecall", "tailrecall", "itemcoverage",
                      "averagepopularity")} for row in rows}
    energy = {row: {"dir_frac": float(rng.uniform()), "shared_frac": float(rng.uniform()),
                    "emb_r1": float(rng.uniform()), "emb_erank": float(rng.uniform(1, 8))} for row in rows}
    energy["separated_beta0"] = energy["separated"]
    specificity = {"standard": {"p_value": 0.001, "p_value_shared": 0.001},
                   "separated": {"p_value": p_sep, "p_value_shared": 0.5}}
    reductions = {"separated": {"R_dir": float(rng.uniform(0.9, 1)), "R_shared": float(rng.uniform(0.9, 1)),
                                "p_value_dir": 0.001, "p_value_shared": 0.02, "p_iso_shared": 0.02}}
    return {"seed": seed, "metrics": metrics, "energy": energy, "specificity": specificity,
            "reductions": reductions, "fit_seconds": {"standard": 2.0, "separated": 2.0 + seed}}


ARMS_INFO = [
    {"name": "standard", "label": "RecBole SASRec (tau=0)", "rows": ["standard"],
     "row_labels": {"standard": "RecBole SASRec (tau=0)"}},
    {"name": "separated", "label": "sep (beta=1)", "rows": ["separated", "separated_beta0"],
     "row_labels": {"separated": "sep (beta=1)", "separated_beta0": "sep (beta=0)"}},
]


def test_report_uses_fisher_over_seeds_for_the_specificity_sentence() -> None:
    rng = np.random.default_rng(0)
    # 0.06 per seed is not significant alone; three seeds give chi2_6 = -2 sum log 0.06 -> p ~ 0.0097
    records = [_record(s, rng, 0.06) for s in range(3)]
    payload = summarise("SASRec", "toy", ARMS_INFO, records, topk=10, permutations=999, confidence=0.95)
    fisher = stats.chi2.sf(-6 * np.log(0.06), 6)
    assert payload["specificity"]["separated"]["p_value"]["combined"] == pytest.approx(fisher, rel=1e-12)
    assert f"**the separated arm {STILL_DIR}** (p = {fisher:#.2g} for dir_frac" in payload["markdown"]
    assert "Fisher over 3 seeds" in payload["markdown"]
    one = summarise("SASRec", "toy", ARMS_INFO, records[:1], topk=10, permutations=999, confidence=0.95)
    assert STILL_DIR not in one["markdown"] and "n = 1 seed: interval not shown" in one["markdown"]


def _logit_t_interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    """The t interval of the mean logit, mapped back through the logistic function (written out)."""
    y = np.log(x / (1 - x))
    half = stats.t.ppf(0.5 + confidence / 2, y.size - 1) * y.std(ddof=1) / np.sqrt(y.size)
    return 1 / (1 + np.exp(-(y.mean() - half))), 1 / (1 + np.exp(-(y.mean() + half)))


def test_report_intervals_and_paired_deltas_from_hand_made_records() -> None:
    rng = np.random.default_rng(1)
    records = [_record(s, rng, 0.5) for s in range(4)]
    payload = summarise("SASRec", "toy", ARMS_INFO, records, topk=10, permutations=999, confidence=0.9)
    t = stats.t.ppf(0.95, 3)
    for row in payload["summary"]:
        x = np.array([r["metrics"][row["row"]]["mrr@10"] for r in records])
        cell = row["mrr@10"]
        assert cell["mean"] == pytest.approx(x.mean(), rel=1e-12)
        low, high = _logit_t_interval(x, 0.9)
        assert (cell["ci"]["low"], cell["ci"]["high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
        pop = np.log([r["metrics"][row["row"]]["averagepopularity@10"] for r in records])  # positive: log scale
        half = t * pop.std(ddof=1) / 2
        assert row["averagepopularity@10"]["ci"]["low"] == pytest.approx(np.exp(pop.mean() - half), rel=1e-10)
    beta0 = next(d for d in payload["deltas"] if d["row"] == "separated_beta0")
    d = np.array([r["metrics"]["separated_beta0"]["ndcg@10"] - r["metrics"]["standard"]["ndcg@10"] for r in records])
    assert beta0["ndcg@10"]["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-10)
    assert beta0["ndcg@10"]["ci"]["low"] == pytest.approx(d.mean() - t * d.std(ddof=1) / 2, rel=1e-10)
    R = np.array([r["reductions"]["separated"]["R_dir"] for r in records])  # R <= 1: log of 1 - R
    half = t * np.log1p(-R).std(ddof=1) / 2
    cell = payload["reductions"]["separated"]["R_dir"]
    assert cell["ci"]["high"] == pytest.approx(1 - np.exp(np.log1p(-R).mean() - half), rel=1e-10)
    ratio = payload["summary"][1]["fit_ratio"]
    assert ratio["per_seed"] == [1.0, 1.5, 2.0, 2.5]
    assert "mean [90% interval over 4 seeds" in payload["markdown"]


def test_intervals_stay_inside_the_range_of_their_quantity() -> None:
    """Small, skewed, near-bound seed values (the case the plain t interval gets wrong)."""
    rng = np.random.default_rng(2)
    below = 0
    for _ in range(200):
        n = int(rng.integers(3, 7))
        unit = rng.beta(0.3, 8.0, size=n)
        cell = seed_cell(list(unit), 0.95, "unit")
        assert 0 < cell["ci"]["low"] <= cell["ci"]["high"] < 1
        plain_low = unit.mean() - stats.t.ppf(0.975, n - 1) * unit.std(ddof=1) / np.sqrt(n)
        below += plain_low < 0
        positive = seed_cell(list(rng.lognormal(4.0, 1.5, size=n)), 0.95, "positive")
        assert positive["ci"]["low"] > 0
        R = 1 - rng.lognormal(-3.0, 1.0, size=n)
        red = seed_cell(list(R), 0.95, "reduction")
        assert red["ci"]["high"] < 1
    assert below > 100  # the plain t interval leaves [0, 1] in most of these draws; the report's never does
    at_zero = seed_cell([0.0, 0.02, 0.01], 0.95, "unit")  # a tail recall of 0: no logit, the t interval cut at 0
    assert at_zero["ci"]["cut"] and at_zero["ci"]["low"] == 0.0


def test_few_seeds_and_no_spread_give_no_interval_and_no_degenerate_test() -> None:
    two = seed_cell([0.0117, 0.02], 0.95, "unit")
    assert two["ci"] is None and two["note"] == "n = 2 seeds: interval not shown"
    same = delta_cell([0.25, 0.35, 0.45], [1 / 6, 1 / 6 + 0.1, 1 / 6 + 0.2], 0.95)  # the same +0.0833 each seed
    assert same["p_value"] is None and same["ci"] is None and "same difference" in same["note"]
    assert same["mean_diff"] == pytest.approx(0.25 - 1 / 6)
    assert delta_cell([0.2, 0.3], [0.1, 0.1], 0.95)["p_value"] is None


def test_markdown_leads_with_the_headline_and_never_prints_a_negative_bound_for_a_share() -> None:
    rng = np.random.default_rng(3)
    records = [_record(s, rng, 0.5) for s in range(3)]
    for rec in records:  # small accuracies, as on a tiny test set: the plain t interval would go below 0
        for row in rec["metrics"].values():
            row["ndcg@10"] = float(rng.uniform(0.001, 0.03))
    md = summarise("SASRec", "toy", ARMS_INFO, records, topk=10, permutations=999, confidence=0.95)["markdown"]
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Headline"
    headline = md[md.index("## Headline"):md.index(sections[1])]
    assert "NDCG@10" in headline and "dir_frac" in headline and "R_dir vs standard (p)" in headline
    assert "(same model)" in headline  # the beta = 0 row does not repeat the energies of its model
    accuracy = md[md.index("## Accuracy\n"):md.index("## Accuracy minus")]
    bounds = [float(x) for x in re.findall(r"\[(-?[0-9.e-]+),", accuracy)]
    assert bounds and min(bounds) >= 0
