"""The prior-separated mixin (recbole_popprior/model/mixin.py) on SASRec, against RecBole's own
SASRec: tau = beta = 0 is RecBole's model, the training loss, the serving shift and the learned
prior weight (docs/DESIGN.md §1). Every other model: tests/test_model_zoo.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config

from recbole.utils import init_seed

from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation

PRIOR_KEYS = ("log_prior", "log_prior_windows", "prior_window_edges", "prior_tau")


class Setup:
    def __init__(self, data_path: Path, **overrides):
        self.config = Config(model="SASRec", dataset="tiny", config_dict=tiny_config(
            data_path, fast_loader=False, **overrides))
        self.base_config = Config(model="SASRec", dataset="tiny", config_dict=tiny_config(
            data_path, fast_loader=False, popprior_baseline=True, **overrides))
        dataset = create_dataset(self.config)
        self.train_data, self.valid_data, self.test_data = data_preparation(self.config, dataset)
        self.batch = next(iter(self.train_data))
        self.eval_batch = next(iter(self.valid_data))[0]

    def model(self, baseline: bool = False):
        config = self.base_config if baseline else self.config
        init_seed(2020, True)
        return config.model_class(config, self.train_data._dataset)


@pytest.fixture(scope="module")
def setup(tiny_data) -> Setup:
    return Setup(tiny_data, prior_tau=0.9)


def _scores(model, batch):
    model.eval()
    with torch.no_grad():
        return model.full_sort_predict(batch)


def test_tau_beta_zero_is_recbole_sasrec(tiny_data):
    s = Setup(tiny_data, prior_tau=0.0, prior_beta=0.0)
    mine, theirs = s.model(), s.model(baseline=True)
    assert type(theirs).__module__.startswith("recbole.model")
    state = {k: v for k, v in mine.state_dict().items() if k not in PRIOR_KEYS}
    assert state.keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in state.items())
    for model in (mine, theirs):
        model.train()
    init_seed(1, True)
    loss_mine = mine.calculate_loss(s.batch)
    init_seed(1, True)
    loss_theirs = theirs.calculate_loss(s.batch)
    assert torch.equal(loss_mine, loss_theirs)
    assert torch.equal(_scores(mine, s.eval_batch), _scores(theirs, s.eval_batch))


def test_beta_shifts_scores_by_exactly_beta_log_prior(setup):
    model = setup.model()
    model.prior_beta = 0.0
    base = _scores(model, setup.eval_batch).double()
    for beta in (0.5, 1.0, -0.3):
        model.prior_beta = beta
        shifted = _scores(model, setup.eval_batch).double()
        diff = shifted[:, 1:] - base[:, 1:]
        assert torch.allclose(diff, beta * model.log_prior[1:].double().expand_as(diff), atol=1e-6)
        assert torch.all(shifted[:, 0] == -torch.inf)
    # pointwise predict gets the same term
    model.prior_beta = 0.5
    items = setup.eval_batch["item_id"]
    with torch.no_grad():
        pointwise = model.predict(setup.eval_batch)
    full = _scores(model, setup.eval_batch)
    assert torch.allclose(pointwise, full[torch.arange(len(items)), items], atol=1e-5)


def test_training_loss_is_hand_computed_ce_over_he_plus_tau_log_prior(setup):
    model = setup.model()
    model.eval()  # no dropout, so H is what the loss saw
    with torch.no_grad():
        loss = float(model.calculate_loss(setup.batch))
        H = model.forward(setup.batch["item_id_list"], setup.batch["item_length"]).double().numpy()
    E = model.item_embedding.weight.detach().double().numpy()
    log_prior = model.log_prior.double().numpy()
    z = H @ E.T + 0.9 * np.where(np.isfinite(log_prior), log_prior, 0.0)
    z = z[:, 1:]  # padding excluded from the softmax
    y = setup.batch["item_id"].numpy() - 1
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    expected = float(np.mean(lse - z[np.arange(len(y)), y]))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_learned_tau_trains_and_serving_uses_its_value(tiny_data):
    s = Setup(tiny_data, prior_tau="learned")
    model = s.model()
    assert model.prior_tau_learned and float(model.prior_tau.detach()) == 1.0
    assert any(p is model.prior_tau for p in model.parameters())
    model.train()
    loss = model.calculate_loss(s.batch)
    loss.backward()
    grad = model.prior_tau.grad
    assert grad is not None and torch.isfinite(grad) and float(grad) != 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert float(model.prior_tau.detach()) == pytest.approx(1.0 - 0.1 * float(grad))
    with torch.no_grad():
        model.prior_tau.fill_(0.37)
    model.eval()
    with torch.no_grad():
        served = model.full_sort_predict(s.eval_batch)
        learned = model.popprior_learned_scores(s.eval_batch)
    assert model.effective_beta() == pytest.approx(0.37)
    assert torch.allclose(served[:, 1:] - learned[:, 1:], 0.37 * model.log_prior[1:].expand_as(learned[:, 1:]),
                          atol=1e-5)


def test_full_softmax_warns_when_one_batch_of_logits_exceeds_the_budget(tiny_data, caplog):
    """[train_batch_size, n_items] float32 logits against eval_score_budget_mb, computed here."""
    s = Setup(tiny_data)
    n_items = s.train_data._dataset.item_num
    logits_mb = 64 * n_items * 4 / 2**20
    for budget, sampled, warns in ((logits_mb * 0.9, 0, True), (logits_mb * 1.1, 0, False),
                                   (logits_mb * 0.9, 4, False)):
        config = Config(model="SASRec", dataset="tiny", config_dict=tiny_config(
            tiny_data, fast_loader=False, eval_score_budget_mb=budget, softmax_negatives=sampled))
        caplog.clear()
        with caplog.at_level("WARNING"):
            config.model_class(config, s.train_data._dataset)
        lines = [r.getMessage() for r in caplog.records if "full softmax over" in r.getMessage()]
        assert len(lines) == warns, (budget, sampled, lines)
        if warns:
            assert f"{n_items:,} items" in lines[0] and "softmax_negatives" in lines[0]
