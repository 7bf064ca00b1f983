"""PopPermutation's shared-energy test inside a real RecBole evaluation (DESIGN.md §3.1).

Both paths (factorised SASRec, streaming-score GRU4RecCPR) against a reference recomputed
here from the trained model's dense learned scores and the same label permutations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.model.sequential_recommender import GRU4RecCPR

from recbole_popprior.evaluator.energy import permuted_directions, popularity_direction
from recbole_popprior.quick_start import train_and_test
from test_metrics_recbole import B, _dense_reference, _pipeline


@pytest.mark.parametrize("model", ["SASRec", GRU4RecCPR], ids=["factorised", "scores"])
def test_pop_permutation_reports_the_shared_test(model, tiny_data, out_dir):
    pipe = _pipeline(model, tiny_data, out_dir)
    test = train_and_test(pipe, saved=False)["test_result"]
    collector = pipe.trainer.eval_collector
    lp = getattr(pipe.model, "log_prior", None)
    lp = (lp if isinstance(lp, torch.Tensor) else collector.train_log_prior).double().numpy()
    Z = _dense_reference(pipe)[0][:, 1:]
    Zc = Z - Z.mean(axis=1, keepdims=True)
    T = np.sum(Zc**2)
    observed = Zc.shape[0] * (Zc @ popularity_direction(lp)).mean() ** 2 / T
    null = np.array([Zc.shape[0] * (Zc @ lb).mean() ** 2 / T
                     for chunk in permuted_directions(popularity_direction(lp), B, 7) for lb in chunk])
    assert test["pop_p_value_shared"] == pytest.approx((1 + np.sum(null >= observed)) / (B + 1))
    assert test["pop_null_mean_shared"] == pytest.approx(null.mean(), rel=1e-4)
    assert test["pop_null_q95_shared"] == pytest.approx(np.quantile(null, 0.95), rel=1e-4)
    assert test["pop_e_shared"] / test["pop_total"] == pytest.approx(observed, rel=1e-4)
