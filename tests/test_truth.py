"""Measures against a known truth (recbole_popprior/evaluator/truth.py, docs/DESIGN.md §12), each checked
against a dense numpy computation written out here or against scipy / RecBole's own metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.truth import (kl_to_truth, ndcg_at_k, optimum_table, row_spearman,
                                              score_decomposition, table_energy)


def _dense(Z: np.ndarray, log_prior: np.ndarray, windows: np.ndarray | None = None) -> dict[str, float]:
    """DESIGN §3 on a dense score matrix ``Z [m, n]`` (real items only) and ``log_prior [n]``."""
    Zc = Z - Z.mean(axis=1, keepdims=True)
    lc = log_prior - log_prior.mean()
    s = Zc @ (lc / np.linalg.norm(lc))
    total = float((Zc ** 2).sum())
    out = {"dir_frac": float(s @ s) / total, "shared_frac": len(s) * s.mean() ** 2 / float(s @ s),
           "dir": float(s @ s), "shared": len(s) * s.mean() ** 2}
    if windows is not None:
        F = windows - windows.mean(axis=1, keepdims=True)
        Q = np.linalg.svd(F, full_matrices=False)[2][:2].T  # the test's windows have rank 2 after centring
        out["subspace_2"] = float(((Zc @ Q) ** 2).sum()) / total
    return out


def _table(rng: np.random.Generator, n_items: int) -> np.ndarray:
    T = rng.standard_normal((n_items, n_items))
    T[0, :] = np.nan  # padding row and column, as truth_in_recbole_ids gives them
    T[:, 0] = np.nan
    return T


def test_table_energy_is_the_dense_energy_of_the_context_rows() -> None:
    rng = np.random.default_rng(3)
    n_items = 31
    table = _table(rng, n_items)
    prev = rng.integers(1, n_items, size=400)  # contexts repeat: the one-hot Gram has counts > 1
    log_prior = np.log(rng.dirichlet(np.ones(n_items)))
    log_prior[0] = -np.inf
    drift = rng.standard_normal(n_items)
    windows = np.stack([log_prior + 0.3 * t * drift for t in range(3)])  # rank 2 after centring
    windows[:, 0] = -np.inf
    got = table_energy(table, prev, log_prior, windows_log_prior=windows, subspace_energy=1.0)
    ref = _dense(table[prev][:, 1:], log_prior[1:], windows[:, 1:])
    for key in ("dir_frac", "shared_frac", "dir", "shared"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    assert got["subspace_rank"] == 2
    assert got["subspace_frac"] == pytest.approx(ref["subspace_2"], rel=1e-9)


def test_table_energy_refuses_missing_truth_in_a_context_row() -> None:
    rng = np.random.default_rng(0)
    table = _table(rng, 6)
    table[2, 4] = np.nan
    log_prior = np.log(np.full(6, 1 / 5.0))
    log_prior[1] += 0.5
    with pytest.raises(PopPriorError, match="non-finite"):
        table_energy(table, [1, 2, 3], log_prior)
    table_energy(table, [1, 3], log_prior)  # row 2 is not a context: its gap does not matter
    with pytest.raises(PopPriorError, match="real item ids"):
        table_energy(table, [0, 1], log_prior)


def test_optimum_at_tau_one_with_the_true_prior_is_the_pmi_itself() -> None:
    rng = np.random.default_rng(1)
    pmi, log_p = _table(rng, 9), np.log(rng.dirichlet(np.ones(9)))
    log_p[0] = np.nan
    np.testing.assert_allclose(optimum_table(pmi, log_p, log_p, 1.0)[1:, 1:], pmi[1:, 1:])
    np.testing.assert_allclose(optimum_table(pmi, log_p, log_p, 0.0)[1:, 1:], pmi[1:, 1:] + log_p[None, 1:])
    # the optimum's popularity direction falls from the standard model's to the PMI's own at tau = 1
    prev = rng.integers(1, 9, 50)
    curve = [table_energy(optimum_table(pmi, log_p, log_p, t), prev, log_p)["dir"] for t in (0.0, 0.5, 1.0)]
    assert curve[0] > curve[1] > curve[2]
    assert curve[2] == pytest.approx(table_energy(pmi, prev, log_p)["dir"], rel=1e-9)


def test_row_spearman_is_the_mean_of_scipys_per_row_correlations() -> None:
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((40, 12))
    T = 0.5 * Z + rng.standard_normal((40, 12))
    T[3] = np.round(T[3])  # ties, ranked by their mean rank as scipy does
    T[5] = 1.0  # a constant row is skipped
    expected = np.mean([stats.spearmanr(Z[r], T[r])[0] for r in range(40) if r != 5])
    assert row_spearman(Z, T) == pytest.approx(expected, rel=1e-12)
    assert row_spearman(Z, Z + rng.standard_normal((40, 1))) == pytest.approx(1.0)  # a per-row constant is free


def test_kl_to_truth_against_the_direct_sum() -> None:
    rng = np.random.default_rng(4)
    logits, log_cond = rng.standard_normal((7, 5)) * 3, rng.standard_normal((7, 5))
    q = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p = np.exp(log_cond) / np.exp(log_cond).sum(axis=1, keepdims=True)
    assert kl_to_truth(logits, log_cond) == pytest.approx(np.mean((p * np.log(p / q)).sum(axis=1)), rel=1e-10)
    assert kl_to_truth(log_cond + 4.0, log_cond) == pytest.approx(0.0, abs=1e-12)


def test_score_decomposition_recovers_planted_coefficients() -> None:
    rng = np.random.default_rng(5)
    pmi_rows, log_p = rng.standard_normal((300, 20)), np.log(rng.dirichlet(np.ones(20)))
    noise = 0.05 * rng.standard_normal((300, 20))
    Z = 0.8 * pmi_rows + 0.3 * log_p[None, :] + rng.standard_normal((300, 1)) + noise
    got = score_decomposition(Z, pmi_rows, log_p)
    # the reference: ordinary least squares on the centred, flattened regressors
    centre = lambda X: X - X.mean(axis=1, keepdims=True)  # noqa: E731
    X = np.column_stack([centre(pmi_rows).ravel(), np.tile(log_p - log_p.mean(), 300)])
    coef, *_ = np.linalg.lstsq(X, centre(Z).ravel(), rcond=None)
    assert got["pmi_coef"] == pytest.approx(coef[0], rel=1e-9)
    assert got["pop_coef"] == pytest.approx(coef[1], rel=1e-9)
    assert abs(got["pmi_coef"] - 0.8) < 0.02 and abs(got["pop_coef"] - 0.3) < 0.02 and got["r2"] > 0.99


def test_ndcg_at_k_matches_recboles_metric() -> None:
    from recbole.evaluator.metrics import NDCG

    rng = np.random.default_rng(6)
    scores = rng.standard_normal((200, 30))
    scores[:, 0] = -np.inf
    targets = rng.integers(1, 30, 200)
    topk = torch.topk(torch.from_numpy(scores), 10, dim=1).indices.numpy()
    pos_index = torch.from_numpy(topk == targets[:, None])
    metric = NDCG({"metric_decimal_place": 8, "topk": [10]})
    expected = metric.metric_info(pos_index, torch.ones(200, dtype=torch.long).numpy()).mean(axis=0)[-1]
    assert ndcg_at_k(scores, targets, 10) == pytest.approx(float(expected), rel=1e-12)
