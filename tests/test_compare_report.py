"""The comparison report from hand-made per-seed records (docs/DESIGN.md §3.2; recbole_popprior/compare_report.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from recbole_popprior.compare_report import p_cell, specificity_lines, summarise

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
    assert f"p = {p_dir:.3g} for dir_frac" in sep


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
    assert f"**the separated arm {STILL_DIR}** (p = {fisher:.3g} for dir_frac" in payload["markdown"]
    assert "Fisher over 3 seeds" in payload["markdown"]
    one = summarise("SASRec", "toy", ARMS_INFO, records[:1], topk=10, permutations=999, confidence=0.95)
    assert STILL_DIR not in one["markdown"] and "1 seed: no interval" in one["markdown"]


def test_report_intervals_and_paired_deltas_from_hand_made_records() -> None:
    rng = np.random.default_rng(1)
    records = [_record(s, rng, 0.5) for s in range(4)]
    payload = summarise("SASRec", "toy", ARMS_INFO, records, topk=10, permutations=999, confidence=0.9)
    t = stats.t.ppf(0.95, 3)
    for row in payload["summary"]:
        x = np.array([r["metrics"][row["row"]]["mrr@10"] for r in records])
        cell = row["mrr@10"]
        assert cell["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert cell["ci"]["half_width"] == pytest.approx(t * x.std(ddof=1) / 2, rel=1e-12)
    beta0 = next(d for d in payload["deltas"] if d["row"] == "separated_beta0")
    d = np.array([r["metrics"]["separated_beta0"]["ndcg@10"] - r["metrics"]["standard"]["ndcg@10"] for r in records])
    assert beta0["ndcg@10"]["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-10)
    assert beta0["ndcg@10"]["ci"]["low"] == pytest.approx(d.mean() - t * d.std(ddof=1) / 2, rel=1e-10)
    ratio = payload["summary"][1]["fit_ratio"]
    assert ratio["per_seed"] == [1.0, 1.5, 2.0, 2.5]
    assert "mean [90% t-interval over 4 seeds]" in payload["markdown"]
