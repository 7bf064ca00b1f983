"""Pairwise prior separation (recbole_popprior/model/pairwise.py, docs/DESIGN.md §6.2): the
population optimum of the pairwise loss under RecBole's samplers (a closed form, checked by
autograd on the enumerated expected loss), what RecBole's sequential sampler draws, and the
windowed prior of each row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import numpy_log_prior, tiny_config, window_of
from test_model_zoo import _Recorder

from recbole.utils import init_seed

from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation


def _expected_pairwise_loss(f: torch.Tensor, p: torch.Tensor, q_given: torch.Tensor, prior: torch.Tensor,
                            tau: float) -> torch.Tensor:
    """E_{i ~ p, j ~ q(.|i)} -log sigmoid((f_i + tau prior_i) - (f_j + tau prior_j)), enumerated."""
    logit = f + tau * prior
    diff = logit[:, None] - logit[None, :]  # [i, j]
    return -(p[:, None] * q_given * torch.nn.functional.logsigmoid(diff)).sum()


def _excluding_positive(q: torch.Tensor) -> torch.Tensor:
    """``q(j | i) = q_j / (1 - q_i)`` for ``j != i``: RecBole's repeatable sampler redraws the positive."""
    q_given = q[None, :].repeat(len(q), 1)
    q_given.fill_diagonal_(0.0)
    return q_given / q_given.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("tau", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_pairwise_population_optimum_is_log_p_minus_log_q_minus_tau_log_prior(tau, sampler):
    """DESIGN §6.2: with negatives q(j|i) = q_j / (1 - q_i), the expected pairwise loss is
    minimised by f_i = log p(i|c) - log q_i - log(1 - q_i) - tau log p_hat(i) (+ any constant):
    the dot product targets PMI + (1 - tau) log p under uniform negatives, as under the softmax."""
    rng = np.random.default_rng(3)
    n = 7
    p = torch.tensor(rng.dirichlet(np.ones(n)), dtype=torch.float64)  # p(i|c)
    prior = torch.log(torch.tensor(rng.dirichlet(np.ones(n)), dtype=torch.float64))  # any log p_hat
    q = torch.full((n,), 1.0 / n, dtype=torch.float64) if sampler == "uniform" else \
        torch.tensor(rng.dirichlet(np.ones(n) * 2), dtype=torch.float64)
    q_given = _excluding_positive(q)
    optimum = torch.log(p) - torch.log(q) - torch.log1p(-q) - tau * prior
    for f0, stationary in [(optimum, True), (optimum + 3.0, True), (torch.log(p), tau == 0 and sampler == "uniform"),
                           (optimum + 0.1 * torch.arange(n, dtype=torch.float64), False)]:
        f = f0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_expected_pairwise_loss(f, p, q_given, prior, tau), f)
        if stationary:
            assert grad.abs().max() < 1e-12, grad
        else:
            assert grad.abs().max() > 1e-4, grad


def test_recbole_sequential_sampler_redraws_only_the_positive(tiny_data):
    """The q of DESIGN §6.2 for RecBole's sequential BPR: uniform over the real items, the row's
    positive excluded, the user's history NOT excluded (RepeatableSampler)."""
    config = Config(model="SASRec", dataset="tiny", config_dict=tiny_config(tiny_data, fast_loader=False,
                                                                               loss_type="BPR"))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    init_seed(0, True)
    hits_history, pairs = 0, 0
    counts = np.zeros(train_data._dataset.item_num)
    for _ in range(3):
        for batch in train_data:
            pos, neg = batch["item_id"], batch["neg_item_id"]
            assert torch.all(neg != pos) and torch.all(neg > 0)
            hits_history += int((batch["item_id_list"] == neg[:, None]).any(dim=1).sum())
            pairs += len(neg)
            counts += np.bincount(neg.numpy(), minlength=len(counts))
    assert hits_history > 0.1 * pairs  # the history is not excluded
    # uniform over the real items: every count within 5 sd of its mean (about 3 x 540 draws over 30 items)
    mean = counts[1:].mean()
    assert np.all(np.abs(counts[1:] - mean) < 5 * np.sqrt(mean))


def test_windowed_pairwise_prior_uses_each_rows_window(tiny_data):
    """prior_mode windowed: each score of a pair gets log p_hat of ITS ROW's window (the window of
    the row's target time), on the same items as RecBole's BPR pair."""
    tau = 0.7
    settings = tiny_config(tiny_data, fast_loader=False, loss_type="BPR", prior_tau=tau,
                           prior_mode="windowed", prior_windows=3)
    config = Config(model="SASRec", dataset="tiny", config_dict=settings)
    base_config = Config(model="SASRec", dataset="tiny", config_dict={**settings, "popprior_baseline": True})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    batch = next(iter(train_data))
    init_seed(1, True)
    model = config.model_class(config, train_data._dataset)
    init_seed(1, True)
    baseline = base_config.model_class(base_config, train_data._dataset)
    model.eval()
    baseline.eval()
    recorder = _Recorder(baseline.loss_fct)
    baseline.loss_fct = recorder
    with torch.no_grad():
        loss = float(model.calculate_loss(batch))
        baseline.calculate_loss(batch)
    (pos, neg, _), = recorder.calls
    # the windows and their priors by hand from the training split (DESIGN §2), not from the model
    train = train_data.dataset
    items, times = train.inter_feat["item_id"].numpy(), train.inter_feat["timestamp"].numpy()
    train_window = window_of(times, times, 3)
    priors = np.stack([numpy_log_prior(items[train_window == t], train.item_num) for t in range(3)])
    windows = window_of(batch["timestamp"].numpy(), times, 3)
    assert len(set(windows.tolist())) > 1  # the batch spans several windows

    def bpr(log_prior_pos: np.ndarray, log_prior_neg: np.ndarray) -> float:
        d = (pos.numpy() + tau * log_prior_pos) - (neg.detach().double().numpy() + tau * log_prior_neg)
        return float(-np.mean(np.log(1e-10 + 1.0 / (1.0 + np.exp(-d)))))

    pos_items, neg_items = batch["item_id"].numpy(), batch["neg_item_id"].numpy()
    assert loss == pytest.approx(bpr(priors[windows, pos_items], priors[windows, neg_items]), rel=1e-5)
    static = numpy_log_prior(items, train.item_num)
    assert abs(loss - bpr(static[pos_items], static[neg_items])) > 1e-4  # the windows matter on this batch


def test_bert4rec_pairwise_learned_tau_has_a_finite_gradient_with_padding_slots(tiny_data):
    """BERT4Rec's BPR scores every mask slot; padding slots (item 0, log prior -inf) must add
    nothing to the loss nor NaN to a learned tau's gradient."""
    config = Config(model="BERT4Rec", dataset="tiny", config_dict=tiny_config(
        tiny_data, fast_loader=False, loss_type="BPR", prior_tau="learned", mask_ratio=0.6))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    init_seed(1, True)
    model = config.model_class(config, train_data._dataset)
    model.train()
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    masked = batch[model.MASK_INDEX] if model.MASK_INDEX in batch else None
    assert masked is not None and bool((masked == 0).any())  # the batch has padding slots
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.prior_tau.grad) and model.prior_tau.grad != 0
