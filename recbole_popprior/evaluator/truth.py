"""Measures against a known truth: what a model's learned scores hold next to the generator's PMI
(docs/DESIGN.md §12; the generator: :mod:`recbole_popprior.data.synthetic`).

On the synthetic data the context of a step is its previous item, so the population-optimal
score row of an evaluation context ``c`` is a row of a known table: ``PMI[prev(c)]`` for what
prior separation should leave, ``PMI[prev(c)] + log p - tau log p_hat`` for what a model trained
at ``tau`` should learn (DESIGN §1). :func:`table_energy` measures such a table with the very
§3 energies the models get (same contexts, same direction ``l``), through the factorised path
with one-hot contexts; the other functions compare a model's dense learned scores
``Z [m, n]`` (padding column already dropped) with the truth's rows. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import ContextStats, as_float64, energy_from_stats


def _finite_table(table: Any, prev: np.ndarray) -> np.ndarray:
    T = as_float64(table)
    if T.ndim != 2 or T.shape[0] != T.shape[1]:
        raise PopPriorError(f"a truth table must be [n_items, n_items], got shape {T.shape}")
    T = T.copy()
    T[0, :] = 0.0  # the padding row and column: never a context, never scored
    T[:, 0] = 0.0
    used = np.unique(prev)
    if used.size and (used.min() < 1 or used.max() >= T.shape[0]):
        raise PopPriorError("context items must be real item ids (1..n_items-1)")
    if not np.all(np.isfinite(T[used][:, 1:])):
        raise PopPriorError("the truth table has non-finite entries in rows that are evaluation contexts")
    unused = np.ones(T.shape[0], dtype=bool)
    unused[used] = False
    T[unused] = 0.0  # rows of no context carry weight 0 (their count in G); their gaps do not matter
    return T


def table_energy(table: Any, prev: Any, log_prior: Any, *, windows_log_prior: Any = None,
                 subspace_energy: float = 0.95, permutations: int = 0, seed: int = 0) -> dict[str, Any]:
    """DESIGN §3 energies of the score matrix whose row for context ``c`` is ``table[prev[c]]``.

    ``table`` is ``[n_items, n_items]`` in RecBole ids (row = previous item, column = next item;
    padding row/column ignored), ``prev`` the previous item of each of the ``m`` contexts. As a
    factorisation, ``H`` is the one-hot of ``prev`` and ``E = table^T``, so ``G = H^T H`` is the
    diagonal of the context counts: the energies come from :func:`energy_from_stats`, exactly
    as a model's do (its item-label permutation test too, with ``permutations``), without
    building the ``m x n`` matrix.
    """
    prev = np.asarray(prev, dtype=np.int64).reshape(-1)
    T = _finite_table(table, prev)
    counts = np.bincount(prev, minlength=T.shape[0]).astype(np.float64)
    stats_ = ContextStats(G=np.diag(counts), hsum=counts.copy(), m=int(prev.shape[0]))
    return energy_from_stats(stats_, T.T, log_prior, windows_log_prior=windows_log_prior,
                             subspace_energy=subspace_energy, permutations=permutations, seed=seed)


def optimum_table(pmi: Any, log_p: Any, log_prior: Any, tau: float) -> np.ndarray:
    """The learned dot product's population optimum at training weight ``tau`` (DESIGN §1):
    ``PMI(c, i) + log p(i) - tau log p_hat(i)``, up to a per-context constant."""
    lp, prior = as_float64(log_p).copy(), as_float64(log_prior).copy()
    lp[0], prior[0] = 0.0, 0.0
    return as_float64(pmi) + (lp - tau * prior)[None, :]


def _centre(Z: np.ndarray) -> np.ndarray:
    return Z - Z.mean(axis=1, keepdims=True)


def row_spearman(Z: Any, T: Any) -> float:
    """Mean over contexts of the Spearman correlation of row ``Z[c]`` with row ``T[c]``.

    Per row, so a per-context constant (which the softmax cannot see) is irrelevant; rows
    where either side is constant are skipped.
    """
    Z, T = as_float64(Z), as_float64(T)
    if Z.shape != T.shape or Z.ndim != 2:
        raise PopPriorError(f"row_spearman needs two [m, n] matrices, got {Z.shape} and {T.shape}")
    rz, rt = _centre(stats.rankdata(Z, axis=1)), _centre(stats.rankdata(T, axis=1))
    num = (rz * rt).sum(axis=1)
    den = np.sqrt((rz * rz).sum(axis=1) * (rt * rt).sum(axis=1))
    ok = den > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(num[ok] / den[ok]))


def _log_softmax(X: np.ndarray) -> np.ndarray:
    top = X.max(axis=1, keepdims=True)
    return X - top - np.log(np.exp(X - top).sum(axis=1, keepdims=True))


def kl_to_truth(logits: Any, log_cond: Any) -> float:
    """Mean over contexts of ``KL(p(.|c) || softmax(logits[c]))`` in nats.

    ``logits``: the model's training logits ``h.e + tau log p_hat`` (its next-item distribution),
    ``log_cond``: the true ``log p(i | c)`` rows. Zero only at the population optimum.
    """
    logits, log_cond = as_float64(logits), as_float64(log_cond)
    if logits.shape != log_cond.shape:
        raise PopPriorError(f"kl_to_truth needs matching shapes, got {logits.shape} and {log_cond.shape}")
    log_q = _log_softmax(logits)
    log_p = _log_softmax(log_cond)  # renormalised over the scored items
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def score_decomposition(Z: Any, pmi_rows: Any, log_p: Any) -> dict[str, float]:
    """Least squares ``Zc = a PMIc + b 1 (P_n log p)^T + residual`` over every (context, item).

    ``Zc`` and ``PMIc`` are centred over items. ``b`` is the popularity the learned scores hold
    in units of ``log p`` (DESIGN §1 predicts ``1`` for the standard model and ``1 - tau`` for
    the separated one at the optimum); ``a`` is the PMI's weight (``1`` at the optimum, below 1
    for a model that has not fitted, or shrinks, the PMI); ``r2`` is the share of ``Zc``'s
    energy the two terms explain.
    """
    Zc, Pc = _centre(as_float64(Z)), _centre(as_float64(pmi_rows))
    lp = as_float64(log_p).reshape(-1)
    lc = lp - lp.mean()
    if Zc.shape != Pc.shape or Zc.shape[1] != lc.shape[0]:
        raise PopPriorError(f"score_decomposition: shapes {Zc.shape}, {Pc.shape}, {lc.shape} do not match")
    m = Zc.shape[0]
    col = Pc.sum(axis=0)  # sum_c PMIc[c, :]
    A = np.array([[np.sum(Pc * Pc), col @ lc], [col @ lc, m * (lc @ lc)]])
    y = np.array([np.sum(Zc * Pc), Zc.sum(axis=0) @ lc])
    a, b = np.linalg.solve(A, y)
    residual = Zc - a * Pc - b * lc[None, :]
    total = float(np.sum(Zc * Zc))
    return {"pmi_coef": float(a), "pop_coef": float(b),
            "r2": float(1.0 - np.sum(residual * residual) / total) if total > 0 else float("nan")}


def ndcg_at_k(scores: Any, targets: Any, k: int) -> float:
    """NDCG@k with one relevant item per row (RecBole's full-sort NDCG for next-item data):
    ``1 / log2(1 + rank)`` when the target ranks in the top ``k``; ties rank the target last.
    ``scores`` covers every item id (put ``-inf`` in the padding column), ``targets`` are item ids."""
    S = as_float64(scores)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if S.ndim != 2 or t.shape[0] != S.shape[0]:
        raise PopPriorError(f"ndcg_at_k needs [m, n] scores and m targets, got {S.shape} and {t.shape}")
    target = S[np.arange(S.shape[0]), t]
    rank = np.count_nonzero(S >= target[:, None], axis=1)  # items scoring at least as high, itself included
    gain = np.where(rank <= k, 1.0 / np.log2(1.0 + rank), 0.0)
    return float(gain.mean())


__all__ = ["table_energy", "optimum_table", "row_spearman", "kl_to_truth", "score_decomposition", "ndcg_at_k"]
