"""Rows of weight 0 are as if absent (docs/DESIGN.md §9.1): BERT4Rec's empty mask slots are weighted
out of every training objective instead of indexed away (an index by a boolean mask has a
data-dependent shape and waits for the device). Each objective with weights is checked against the
same objective on the kept rows only, values and gradients."""

from __future__ import annotations

import pytest
import torch

from recbole_popprior.model.objective import TrainingBatch
from recbole_popprior.model.remedy_objectives import AdapTauObjective, full_softmax_loss
from recbole_popprior.model.sampled_softmax import SampledSoftmax
from recbole_popprior.remedies import directspec_loss
from recbole_popprior.remedies.resn import LINKS, resn_penalty

N_ITEMS, D, ROWS = 13, 6, 10


class _Prior:
    """The model's side of an objective: ``tau log p_hat`` (static prior), no windows."""

    training = True

    def __init__(self, log_prior: torch.Tensor, tau: float = 0.7):
        self.log_prior, self.prior_tau, self.prior_tau_learned = log_prior, tau, False

    def prior_at_targets(self, targets, window_ids):
        return self.prior_tau * self.log_prior[targets]

    def prior_at_items(self, items, window_ids):
        return self.prior_tau * self.log_prior[items]

    def prior_logit_term(self, window_ids):
        term = self.prior_tau * self.log_prior
        return term.masked_fill(~torch.isfinite(self.log_prior), -torch.inf)


@pytest.fixture()
def rows():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(ROWS, D, generator=g, dtype=torch.float64)
    E = torch.randn(N_ITEMS, D, generator=g, dtype=torch.float64)
    targets = torch.randint(1, N_ITEMS, (ROWS,), generator=g)
    weights = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    log_prior = torch.log_softmax(torch.randn(N_ITEMS, generator=g, dtype=torch.float64), 0)
    log_prior[0] = -torch.inf
    return H, E, targets, weights, log_prior


def _both(loss_of, H, weights):
    """(weighted loss, its grad on H) and (loss of the kept rows, its grad scattered back)."""
    Hw = H.clone().requires_grad_(True)
    weighted = loss_of(Hw, weights)
    (g_w,) = torch.autograd.grad(weighted, Hw)
    keep = weights > 0
    Hk = H[keep].clone().requires_grad_(True)
    kept = loss_of(Hk, None, keep)
    (g_k,) = torch.autograd.grad(kept, Hk)
    return weighted, g_w, kept, g_k, keep


def _assert_same(weighted, g_w, kept, g_k, keep):
    torch.testing.assert_close(weighted, kept, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_w[keep], g_k, rtol=1e-10, atol=1e-12)
    assert torch.all(g_w[~keep] == 0)


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("shrink", [0.0, 0.03])
def test_directspec(rows, plus, shrink):
    H, E, targets, weights, _ = rows

    def loss(h, w, keep=None):
        t = targets if keep is None else targets[keep]
        return directspec_loss(h, E, t, 1.0, 3.0, shrink, plus, weights=w)

    _assert_same(*_both(loss, H, weights))


@pytest.mark.parametrize("link", LINKS)
def test_resn(rows, link):
    H, E, _, weights, _ = rows
    _assert_same(*_both(lambda h, w, keep=None: resn_penalty(h, E, link, 3, weights=w), H, weights))


def test_full_softmax(rows):
    H, E, targets, weights, log_prior = rows
    model = _Prior(log_prior)

    def loss(h, w, keep=None):
        t = targets if keep is None else targets[keep]
        return full_softmax_loss(model, TrainingBatch(h, E, t, weights=w), h @ E.T)

    _assert_same(*_both(loss, H, weights))


@pytest.mark.parametrize("k", [4, N_ITEMS + 3])
def test_sampled_softmax(rows, k):
    H, E, targets, weights, log_prior = rows
    model = _Prior(log_prior)
    objective = SampledSoftmax(torch.exp(log_prior), k)
    draw = objective.draw()
    objective.draw = lambda: draw  # the same candidates for both

    def loss(h, w, keep=None):
        t = targets if keep is None else targets[keep]
        return objective.loss(model, TrainingBatch(h, E, t, weights=w))

    _assert_same(*_both(loss, H, weights))


def test_adap_tau_loss_and_epoch_sums(rows):
    H, E, targets, weights, _ = rows
    users = torch.tensor([1, 2, 2, 3, 1, 4, 4, 5, 1, 3])
    train_users = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5])
    objectives = [AdapTauObjective(N_ITEMS - 1, train_users, 6, 1.0, "mean", 0.2, 0, 0.7) for _ in range(2)]
    model = _Prior(None)
    weighted = objectives[0].loss(model, TrainingBatch(H, E, targets, users=users, weights=weights))
    keep = weights > 0
    kept = objectives[1].loss(model, TrainingBatch(H[keep], E, targets[keep], users=users[keep]))
    torch.testing.assert_close(weighted, kept, rtol=1e-12, atol=1e-12)
    a, b = objectives
    torch.testing.assert_close(a.epoch_loss_sum, b.epoch_loss_sum, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.epoch_loss_count, b.epoch_loss_count)
    torch.testing.assert_close(a.epoch_stats.packed(), b.epoch_stats.packed(), rtol=1e-12, atol=1e-12)
    for objective in objectives:
        objective.on_epoch_start(model, 1)
    torch.testing.assert_close(a.t_user, b.t_user, rtol=1e-12, atol=0)
    assert float(a.t0) == pytest.approx(float(b.t0), rel=1e-12)
