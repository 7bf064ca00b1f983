"""The popularity prior ``log p_hat`` (DESIGN.md §2): closed form, padding, training targets only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config, write_inter

from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.prior import estimate_log_prior


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_estimate_log_prior_matches_closed_form(alpha):
    rng = np.random.default_rng(0)
    n_items = 12
    ids = rng.integers(0, n_items, size=500)  # includes padding 0, which must not count
    got = estimate_log_prior(ids, n_items, alpha).double().numpy()
    counts = np.array([(ids == i).sum() for i in range(1, n_items)], dtype=float)
    expected = np.log((counts + alpha) / (counts.sum() + alpha * (n_items - 1)))
    assert got[0] == -np.inf
    np.testing.assert_allclose(got[1:], expected, rtol=1e-6)
    assert np.exp(got[1:]).sum() == pytest.approx(1.0, abs=1e-6)


def test_unseen_items_get_the_smoothed_floor_and_torch_input_works():
    got = estimate_log_prior(torch.tensor([1, 1, 2]), 5, alpha=1.0).numpy()
    np.testing.assert_allclose(np.exp(got[1:]), [3 / 7, 2 / 7, 1 / 7, 1 / 7], rtol=1e-6)


@pytest.mark.parametrize("ids,n_items,alpha", [([1, 5], 5, 1.0), ([-1], 5, 1.0), ([1], 5, 0.0), ([1], 1, 1.0)])
def test_bad_prior_input_is_refused(ids, n_items, alpha):
    with pytest.raises(ValueError):
        estimate_log_prior(ids, n_items, alpha)


def test_model_prior_counts_training_targets_only(tmp_path):
    """The last two items of every user (its validation and test targets) are items that
    appear nowhere else: counting them would give those items N_i = 1 instead of 0."""
    rng = np.random.default_rng(3)
    n_users, length, n_common = 30, 8, 10
    rows, sequences = [], {}
    for u in range(1, n_users + 1):
        seq = [int(i) for i in rng.integers(1, n_common + 1, size=length)] + [100 + 2 * u, 101 + 2 * u]
        sequences[u] = seq
        rows += [(u, item, 1000 * u + t) for t, item in enumerate(seq)]
    write_inter(tmp_path / "held" / "held.inter", rows)
    config = Config(model="SASRec", dataset="held", config_dict=tiny_config(tmp_path, fast_loader=False, prior_alpha=0.5))
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = config.model_class(config, train_data._dataset)

    # closed form over the training targets: positions 2..length of each sequence (by token)
    tokens = [str(item) for seq in sequences.values() for item in seq[1:length]]
    n_items = dataset.item_num
    counts = np.zeros(n_items)
    for token in tokens:
        counts[dataset.token2id("item_id", token)] += 1
    expected = np.log((counts[1:] + 0.5) / (counts.sum() + 0.5 * (n_items - 1)))
    got = model.log_prior.double().numpy()
    assert got[0] == -np.inf
    np.testing.assert_allclose(got[1:], expected, rtol=1e-5)
    held_out = [dataset.token2id("item_id", str(seq[-k])) for seq in sequences.values() for k in (1, 2)]
    assert np.allclose(got[held_out], np.log(0.5 / (counts.sum() + 0.5 * (n_items - 1))))
