"""Embedding diagnostics and accuracy by popularity band (docs/DESIGN.md §4).

Every function takes the item table ``E`` [n_items, d] with row 0 = padding, and
EXCLUDES the padding row. All of them are ``O(n d^2)`` or cheaper in the item count.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import _project, as_float64, centred_item_gram

HEAD, MIDDLE, TAIL = 0, 1, 2
BAND_NAMES = ("head", "mid", "tail")


def _spectrum(E: Any, C: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (descending) and right singular vectors of the centred ``E[1:]``."""
    C = torch.from_numpy(np.ascontiguousarray(centred_item_gram(E) if C is None else C))
    eigval, eigvec = (x.numpy() for x in torch.linalg.eigh(C))
    order = np.argsort(eigval)[::-1]
    return np.clip(eigval[order], 0.0, None), eigvec[:, order]


def spectrum_stats(E: Any, *, _spec: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """``R1 = s_1^2 / sum s_k^2`` and ``erank = exp(-sum rho_k log rho_k)`` (DESIGN §4)."""
    s2, _ = _spec if _spec is not None else _spectrum(E)
    total = s2.sum()
    if total <= 0:
        return {"R1": math.nan, "erank": math.nan}
    rho = s2 / total
    rho = rho[rho > 0]
    return {"R1": float(s2[0] / total), "erank": float(math.exp(-np.sum(rho * np.log(rho))))}


def mean_pairwise_cosine(E: Any) -> float:
    """Mean cosine over ordered pairs i != j of (uncentred) item rows, in ``O(n d)``.

    With unit rows ``u_i``: ``sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - k``. Zero rows have no
    direction and are left out of the pairs.
    """
    E1 = as_float64(E)[1:]
    norms = torch.linalg.vector_norm(torch.from_numpy(E1), dim=1).numpy()
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    k = int(np.count_nonzero(norms > 0))
    if k < 2:
        return math.nan
    total = _project(E1.T, inv)  # sum_i u_i = E1^T (1 / ||e_i||)
    return float((total @ total - k) / (k * (k - 1)))


def pc1_prior_corr(E: Any, log_prior: Any, *, _spec: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """``|corr(PC1 scores of E[1:], log p_hat[1:])|`` (Pearson; DESIGN §4)."""
    E = as_float64(E)
    lp = as_float64(log_prior).reshape(-1)
    if lp.shape[0] != E.shape[0]:
        raise PopPriorError(f"log_prior has {lp.shape[0]} entries, E has {E.shape[0]} rows")
    _, vecs = _spec if _spec is not None else _spectrum(E)
    E1 = E[1:]
    scores = _project(E1, vecs[:, 0]) - E1.mean(axis=0) @ vecs[:, 0]
    lp = lp[1:] - lp[1:].mean()
    scores = scores - scores.mean()
    denom = np.linalg.norm(scores) * np.linalg.norm(lp)
    return float(abs(scores @ lp) / denom) if denom > 0 else math.nan


def balance_error(G: Any, E: Any) -> float:
    """``||H^T H - E^T E||_F / ||H^T H||_F`` with ``G = H^T H`` (sum over the contexts).

    ``E`` is the padding-EXCLUDED, uncentred item table ``E[1:]``.
    """
    G = as_float64(G)
    E1 = as_float64(E)[1:]
    if G.shape != (E1.shape[1], E1.shape[1]):
        raise PopPriorError(f"G is {G.shape} but E has width {E1.shape[1]}")
    norm = np.linalg.norm(G)
    return float(np.linalg.norm(G - _project(E1.T, E1)) / norm) if norm > 0 else math.nan


def embedding_diagnostics(E: Any, log_prior: Any = None, G: Any = None,
                          item_gram: np.ndarray | None = None) -> dict[str, float]:
    """All DESIGN §4 embedding numbers: ``R1``, ``erank``, ``mean_cos``, ``pc1_corr``, ``balance_err``.

    ``pc1_corr`` needs ``log_prior`` and ``balance_err`` needs ``G = H^T H``; each is NaN
    without its input. ``item_gram``: the centred Gram of ``E[1:]`` if already computed.
    """
    E = as_float64(E)  # one conversion, one spectrum for all of them
    spec = _spectrum(E, item_gram)
    out = spectrum_stats(E, _spec=spec)
    out["mean_cos"] = mean_pairwise_cosine(E)
    out["pc1_corr"] = pc1_prior_corr(E, log_prior, _spec=spec) if log_prior is not None else math.nan
    out["balance_err"] = balance_error(G, E) if G is not None else math.nan
    return out


def popularity_bands(counts: Any, n_items: int | None = None,
                     split: tuple[float, float, float] = (0.2, 0.6, 0.2)) -> np.ndarray:
    """Band of every item id: 0 head, 1 middle, 2 tail, -1 padding (DESIGN §4).

    ``counts`` is a per-item array ``[n_items]`` or a mapping ``{item_id: count}`` (RecBole's
    ``data.count_items``). Items 1..n-1 are sorted by training count, descending; **ties are
    broken by item id, ascending** (the lower id counts as the more popular), so the bands have
    exactly ``round(0.2 n)`` head and ``round(0.2 n)`` tail items and the rule is deterministic.
    Items with equal counts can therefore straddle a band boundary.
    """
    if isinstance(counts, dict) or hasattr(counts, "items") and not hasattr(counts, "shape"):
        if n_items is None:
            n_items = int(max(counts.keys(), default=0)) + 1
        array = np.zeros(n_items, dtype=np.int64)
        for item, count in counts.items():
            if 0 <= int(item) < n_items:
                array[int(item)] = int(count)
        counts = array
    counts = np.asarray(as_float64(counts)).reshape(-1)
    if n_items is not None and counts.shape[0] != n_items:
        raise PopPriorError(f"counts cover {counts.shape[0]} items, expected {n_items}")
    n = counts.shape[0] - 1
    if n < 1:
        raise PopPriorError("popularity bands need at least one real item")
    ids = np.arange(1, n + 1)
    order = ids[np.lexsort((ids, -counts[1:]))]  # count desc, then id asc
    n_head, n_tail = round(split[0] * n), round(split[2] * n)
    bands = np.full(n + 1, MIDDLE, dtype=np.int64)
    bands[0] = -1
    bands[order[:n_head]] = HEAD
    if n_tail:
        bands[order[n - n_tail:]] = TAIL
    return bands


def band_recall(topk_items: Any, target_rows: Any, target_items: Any, bands: np.ndarray,
                ks: Iterable[int]) -> dict[str, float]:
    """Recall@K restricted to the targets of each popularity band (DESIGN §4).

    For every evaluation row with at least one target in the band: (band targets in the
    top K) / (band targets); averaged over those rows. NaN for a band with no targets.
    ``topk_items`` is RecBole's ``rec.items`` [rows, max K]; ``target_rows`` /
    ``target_items`` list the positive (row, item) pairs.
    """
    topk = np.asarray(topk_items.cpu() if hasattr(topk_items, "cpu") else topk_items)
    rows = np.asarray(target_rows.cpu() if hasattr(target_rows, "cpu") else target_rows).astype(np.int64)
    items = np.asarray(target_items.cpu() if hasattr(target_items, "cpu") else target_items).astype(np.int64)
    ks = list(ks)
    if ks and max(ks) > topk.shape[1]:
        raise PopPriorError(f"top-K list has {topk.shape[1]} columns, K up to {max(ks)} requested")
    match = topk[rows] == items[:, None]  # [pairs, max K]
    rank = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    band = bands[items]
    n_rows = topk.shape[0]
    out: dict[str, float] = {}
    for b, name in enumerate(BAND_NAMES):
        sel = band == b
        pos = np.bincount(rows[sel], minlength=n_rows)
        has = pos > 0
        for k in ks:
            hits = np.bincount(rows[sel], weights=(rank[sel] < k).astype(np.float64), minlength=n_rows)
            out[f"{name}recall@{k}"] = float(np.mean(hits[has] / pos[has])) if has.any() else math.nan
    return out
