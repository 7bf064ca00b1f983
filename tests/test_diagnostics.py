"""Embedding diagnostics and popularity-band recall (DESIGN.md §4) against dense references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator import band_recall, embedding_diagnostics, popularity_bands
from recbole_popprior.evaluator.diagnostics import mean_pairwise_cosine


def _table(rng, n_items=400, d=16, popular_axis=0.0):
    counts = rng.zipf(1.5, size=n_items).astype(float)
    lp = np.log(counts / counts.sum())
    lp[0] = -np.inf
    E = rng.standard_normal((n_items, d)) + 0.2
    E[1:, 0] += popular_axis * (lp[1:] - lp[1:].mean())
    E[0] = 50.0  # padding row: must be excluded
    return E, lp


@pytest.mark.parametrize("axis", [0.0, 3.0])
def test_embedding_diagnostics_match_dense_reference(axis):
    rng = np.random.default_rng(int(axis))
    E, lp = _table(rng, popular_axis=axis)
    H = rng.standard_normal((70, 16))
    got = embedding_diagnostics(torch.from_numpy(E), lp, H.T @ H)
    E1 = E[1:]
    Ec = E1 - E1.mean(axis=0)
    _, s, Vt = np.linalg.svd(Ec, full_matrices=False)
    rho = s**2 / np.sum(s**2)
    U = E1 / np.linalg.norm(E1, axis=1, keepdims=True)
    cos = U @ U.T
    n = len(E1)
    ref = {"R1": rho[0], "erank": np.exp(-np.sum(rho * np.log(rho))),
           "mean_cos": (cos.sum() - np.trace(cos)) / (n * (n - 1)),
           "pc1_corr": abs(np.corrcoef(Ec @ Vt[0], lp[1:])[0, 1]),
           "balance_err": np.linalg.norm(H.T @ H - E1.T @ E1) / np.linalg.norm(H.T @ H)}
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-8), key
    if axis:
        assert got["pc1_corr"] > 0.9 and got["R1"] > 0.5  # the planted popularity axis dominates


def test_mean_cosine_skips_zero_rows_and_needs_two_rows():
    E = np.array([[9.0, 9.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = [(1, 0), (0, 1), (1, 1)]
    unit = [np.array(p) / np.linalg.norm(p) for p in pairs]
    ref = np.mean([unit[i] @ unit[j] for i in range(3) for j in range(3) if i != j])
    assert mean_pairwise_cosine(E) == pytest.approx(ref)
    assert math.isnan(mean_pairwise_cosine(np.array([[1.0, 1.0], [1.0, 0.0]])))


def test_balance_and_correlation_are_nan_without_inputs():
    E, _ = _table(np.random.default_rng(0))
    got = embedding_diagnostics(E)
    assert math.isnan(got["balance_err"]) and math.isnan(got["pc1_corr"])
    assert 1.0 <= got["erank"] <= E.shape[1]


def test_popularity_bands_split_20_60_20_with_id_tie_break():
    counts = Counter({1: 5, 2: 9, 3: 5, 4: 0, 5: 1, 6: 5, 7: 2, 8: 2, 9: 0, 10: 7})
    bands = popularity_bands(counts, n_items=11)
    # order by (count desc, id asc): 2(9) 10(7) | 1 3 6 (5) 7 8 (2) 5(1) | 4 9 (0)
    assert bands[0] == -1
    assert sorted(np.flatnonzero(bands == 0)) == [2, 10]
    assert sorted(np.flatnonzero(bands == 2)) == [4, 9]
    assert sorted(np.flatnonzero(bands == 1)) == [1, 3, 5, 6, 7, 8]
    # A tie across a boundary: the lower id counts as more popular.
    tie = popularity_bands(np.array([0, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1]))
    assert list(np.flatnonzero(tie == 0)) == [1, 2]
    assert list(np.flatnonzero(tie == 2)) == [9, 10]


def test_band_recall_matches_a_per_row_loop():
    rng = np.random.default_rng(3)
    n_items, rows, K = 50, 40, 10
    counts = rng.integers(0, 30, size=n_items)
    bands = popularity_bands(counts)
    scores = rng.standard_normal((rows, n_items))
    scores[:, 0] = -np.inf
    topk = np.argsort(-scores, axis=1)[:, :K]
    pairs = [(r, int(i)) for r in range(rows) for i in rng.choice(np.arange(1, n_items), size=1 + r % 3, replace=False)]
    got = band_recall(torch.from_numpy(topk), [p[0] for p in pairs], [p[1] for p in pairs], bands, [3, 10])
    for b, name in enumerate(("head", "mid", "tail")):
        for k in (3, 10):
            per_row = {}
            for r, i in pairs:
                if bands[i] == b:
                    hit, tot = per_row.get(r, (0, 0))
                    per_row[r] = (hit + (i in topk[r, :k]), tot + 1)
            ref = np.mean([h / t for h, t in per_row.values()])
            assert got[f"{name}recall@{k}"] == pytest.approx(ref), (name, k)


def test_band_recall_empty_band_is_nan_and_bad_k_raises():
    bands = popularity_bands(np.arange(11))
    topk = np.array([[10, 9, 8]])
    got = band_recall(topk, [0], [10], bands, [1])
    assert got["headrecall@1"] == 1.0 and math.isnan(got["tailrecall@1"])
    with pytest.raises(PopPriorError):
        band_recall(topk, [0], [10], bands, [5])
