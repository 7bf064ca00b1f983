"""Sampled softmax on the factorised training path (recbole_popprior/model/sampled_softmax.py,
docs/DESIGN.md §6): the inclusion probabilities and the draws, the logits against a float64 hand
computation, the exact consistency of the logQ correction (enumerated), every item drawn = the
model's own full softmax for every model that takes it, the refusals, and PMI on known truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import numpy_log_prior, pmi_spearman, theory_settings, tiny_config, window_of
from test_model_zoo import N_ITEMS, Zoo, s3rec_pretrained, zoo_data  # noqa: F401  (fixtures)

from recbole.utils import init_seed

from recbole_popprior.compare import arm_config, train_arm
from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import get_model, supported_models
from recbole_popprior.model.factors import factorised_training_refusal, training_factors
from recbole_popprior.model.objective import TrainingBatch
from recbole_popprior.model.sampled_softmax import SampledSoftmax, inclusion_probabilities


def _water_level(q: np.ndarray, k: float) -> np.ndarray:
    """Reference: ``min(1, c q)`` with ``c`` found by bisection on ``sum = k`` (independent of the sort)."""
    low, high = 0.0, 1.0
    while np.minimum(1.0, high * q).sum() < k:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.minimum(1.0, mid * q).sum() < k else (low, mid)
    return np.minimum(1.0, high * q)


# --- the sampler -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7.5, 11, 12, 40])
def test_inclusion_probabilities_are_the_water_filled_min_1_cq(k):
    rng = np.random.default_rng(0)
    q = np.concatenate([[0.0], rng.pareto(1.0, 12) + 1e-3])  # padding first, heavy-tailed items
    q /= q.sum()
    pi = inclusion_probabilities(torch.tensor(q), k).numpy()
    assert pi[0] == 0.0 and np.all(pi <= 1.0)
    assert pi.sum() == pytest.approx(min(k, 12), rel=1e-12)
    np.testing.assert_allclose(pi, _water_level(q, min(k, 12)) if k < 12 else (q > 0), rtol=1e-9, atol=1e-12)


def test_draws_have_a_fixed_size_and_each_item_its_expected_count_pi():
    """K draws with replacement, item i with probability pi_i / K each: E[count_i] = pi_i per batch,
    the same number of candidates every batch (no data-dependent shape), never padding."""
    q = torch.tensor([0.0, 0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01], dtype=torch.float64)
    objective = SampledSoftmax(q, 4)
    pi = objective.inclusion.numpy()
    assert pi[1] == 1.0  # 4 * 0.4 > 1: the head item is capped at one expected draw a batch
    torch.manual_seed(0)
    draws = 4000
    counts = np.zeros(len(q))
    for _ in range(draws):
        negatives = objective.draw()
        assert negatives.shape == (4,) and negatives.dtype == torch.int64
        counts += np.bincount(negatives.numpy(), minlength=len(q))
    assert counts[0] == 0
    r = pi / 4
    sd = np.sqrt(draws * 4 * r * (1 - r)) + 1e-9  # multinomial counts over all batches
    assert np.all(np.abs(counts - draws * pi) <= 4.5 * sd), (counts / draws, pi)


def test_k_covering_every_item_draws_nothing_and_takes_each_item_once():
    q = torch.tensor([0.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    objective = SampledSoftmax(q, 3)
    assert objective.every_item
    assert objective.draw().tolist() == [1, 2, 3]
    assert not SampledSoftmax(q, 2).every_item


# --- the logits against a hand computation (tiny SASRec) -----------------------------------------
class _Tiny:
    """A prior-separated SASRec on the tiny data, with a spy on the objective's draws."""

    def __init__(self, data_path, **overrides):
        settings = tiny_config(data_path, fast_loader=False, prior_tau=0.7, softmax_negatives=10, **overrides)
        self.config = Config(model="SASRec", dataset="tiny", config_dict=settings)
        dataset = create_dataset(self.config)
        self.train_data, _, _ = data_preparation(self.config, dataset)
        self.batch = next(iter(self.train_data))
        init_seed(2020, True)
        self.model = self.config.model_class(self.config, self.train_data._dataset)
        self.drawn: list[torch.Tensor] = []
        self._negatives: torch.Tensor | None = None
        self.model.training_objective.draw = self._draw

    def _draw(self) -> torch.Tensor:
        self.drawn.append(self._negatives)
        return self._negatives

    def loss_with(self, negatives: torch.Tensor) -> float:
        self._negatives = negatives
        self.model.eval()  # no dropout: H is what the test computes again
        with torch.no_grad():
            return float(self.model.calculate_loss(self.batch))


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # padding: log 0 = -inf, never a candidate
        return np.log(x)


def _reference_loss(H, E, targets, negatives, log_prior_rows, tau, log_pi) -> float:
    """float64 numpy: over [target] + the draws (duplicates and hits kept), logits
    h.e + tau log p_hat - log pi; loss = logsumexp(all) - logsumexp(columns holding the target)."""
    rows = []
    for r, y in enumerate(targets):
        candidates = np.array([y] + list(negatives))
        z = np.array([H[r] @ E[j] + tau * log_prior_rows[r][j] - log_pi[j] for j in candidates])
        lse = lambda v: np.log(np.exp(v - v.max()).sum()) + v.max()  # noqa: E731
        rows.append(lse(z) - lse(z[candidates == y]))
    return float(np.mean(rows))


@pytest.mark.parametrize("sampler", ["popularity", "uniform"])
def test_sampled_logits_are_the_hand_computed_ones(tiny_data, sampler):
    tiny = _Tiny(tiny_data, softmax_sampler=sampler)
    model, batch = tiny.model, tiny.batch
    targets = batch["item_id"].numpy()
    # shared draws with a duplicate, and some rows' targets (accidental hits, one of them twice)
    negatives = torch.tensor([1, 2, 4, 7, 2, int(targets[0]), int(targets[3]), int(targets[3])])
    loss = tiny.loss_with(negatives)
    assert len(tiny.drawn) == 1  # one draw for the whole batch

    with torch.no_grad():
        H = model.forward(batch["item_id_list"], batch["item_length"]).double().numpy()
    E = model.item_embedding.weight.detach().double().numpy()
    train = tiny.train_data.dataset
    log_prior = numpy_log_prior(train.inter_feat["item_id"].numpy(), train.item_num)
    q = np.exp(log_prior) if sampler == "popularity" else np.r_[0.0, np.ones(train.item_num - 1)]
    log_pi = _log(_water_level(q / q.sum(), 10))
    expected = _reference_loss(H, E, targets, negatives.tolist(), [log_prior] * len(H), 0.7, log_pi)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_windowed_rows_use_their_own_window_prior(tiny_data):
    tiny = _Tiny(tiny_data, prior_mode="windowed", prior_windows=3, prior_window_by="time")
    model, batch = tiny.model, tiny.batch
    negatives = torch.tensor([1, 3, 5, 9, 11, 20, 3])
    loss = tiny.loss_with(negatives)
    with torch.no_grad():
        H = model.forward(batch["item_id_list"], batch["item_length"]).double().numpy()
    E = model.item_embedding.weight.detach().double().numpy()
    train = tiny.train_data.dataset
    items, times = train.inter_feat["item_id"].numpy(), train.inter_feat["timestamp"].numpy()
    window = window_of(times, times, 3)
    priors = [numpy_log_prior(items[window == t], train.item_num) for t in range(3)]
    rows = [priors[w] for w in window_of(batch["timestamp"].numpy(), times, 3)]
    assert len({w.tobytes() for w in rows}) > 1  # the batch spans several windows
    log_pi = _log(_water_level(np.exp(numpy_log_prior(items, train.item_num)), 10))
    expected = _reference_loss(H, E, batch["item_id"].numpy(), negatives.tolist(), rows, 0.7, log_pi)
    assert loss == pytest.approx(expected, rel=1e-5)


# --- why the dot product still targets PMI: exact consistency, enumerated ------------------------
class _FreeLogits:
    """Contexts one-hot, so ``H E^T = u`` is a free [contexts, items] logit table; prior tau log p_hat."""

    def __init__(self, log_prior: torch.Tensor, tau: float):
        self.log_prior, self.tau = log_prior, tau

    def prior_at_targets(self, targets, window_ids):
        return self.tau * self.log_prior[targets]

    def prior_at_items(self, items, window_ids):
        return self.tau * self.log_prior[items]


def _expected_loss(objective, model, u, p_true) -> torch.Tensor:
    """E over y ~ p(.|c) and over every ordered K-tuple of draws (probability prod pi_j / K) of the loss."""
    n_ctx, n = p_true.shape
    H = torch.eye(n_ctx, dtype=torch.float64)
    E = u.T  # [n, contexts]; row 0 is padding
    r = objective.inclusion / objective.negatives
    total = torch.zeros((), dtype=torch.float64)
    for draw in itertools.product(range(1, n), repeat=objective.negatives):
        negatives = torch.tensor(draw)
        weight = torch.prod(r[negatives])
        for c in range(n_ctx):
            targets = torch.arange(1, n)
            batch = TrainingBatch(H[[c] * (n - 1)], E, targets)
            logits = objective.logits(model, batch, negatives).double()
            mask = objective.target_mask(batch, negatives)
            rows = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~mask, -torch.inf), 1)
            total = total + weight * (p_true[c, 1:] * rows).sum()
    return total / n_ctx


def test_logq_makes_log_p_given_c_the_minimiser_for_small_k():
    """With K = 3 of 6 items and a popularity sampler (the head item capped at pi = 1), the expected
    sampled loss is stationary at h.e = log p(i|c) - tau log p_hat(i) (DESIGN §6), and without
    the -log pi correction it is not."""
    torch.manual_seed(3)
    n = 7  # padding + 6 items
    p_true = torch.softmax(torch.randn(2, n - 1, dtype=torch.float64) * 1.5, dim=1)
    p_true = torch.cat([torch.zeros(2, 1, dtype=torch.float64), p_true], dim=1)
    log_prior = torch.log(torch.tensor([0.0, 0.45, 0.2, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64))
    model = _FreeLogits(log_prior, tau=0.8)
    objective = SampledSoftmax(torch.exp(log_prior), 3)
    assert objective.inclusion[1] == 1.0 and 0 < objective.inclusion[6] < 1

    optimum = torch.log(p_true[:, 1:]) - 0.8 * log_prior[1:]
    optimum = torch.cat([torch.zeros(2, 1, dtype=torch.float64), optimum], dim=1)
    u = optimum.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_expected_loss(objective, model, u, p_true), u)
    moved = (optimum + 0.3 * torch.randn_like(optimum)).requires_grad_(True)
    (grad_moved,) = torch.autograd.grad(_expected_loss(objective, model, moved, p_true), moved)
    assert grad_moved[:, 1:].abs().max() > 1e-3
    assert grad[:, 1:].abs().max() < 1e-10 * max(1.0, float(grad_moved.abs().max()))

    objective.log_inclusion.zero_()  # no logQ correction: biased towards the sampler
    (biased,) = torch.autograd.grad(_expected_loss(objective, model, u, p_true), u)
    assert biased[:, 1:].abs().max() > 1e-3


# --- every model -------------------------------------------------------------------------------
MODELS = supported_models()
#: the reason each model that cannot take the factorised path gives (from its registry record)
REFUSED = {m: factorised_training_refusal(get_model(m)) for m in MODELS if factorised_training_refusal(get_model(m))}
TAKES = [m for m in MODELS if m not in REFUSED]
_CACHE: dict[tuple, Zoo] = {}


def _zoo(name, data_path, pretrained, **overrides) -> Zoo:
    key = (name, repr(sorted(overrides.items())))
    if key not in _CACHE:
        _CACHE[key] = Zoo(name, data_path, pretrained, **overrides)
    return _CACHE[key]


def test_the_models_that_take_it_are_all_but_the_refused():
    assert sorted(REFUSED) == ["FEARec", "FPMC", "GRU4RecCPR", "RepeatNet", "SASRecCPR", "TransRec"]
    assert len(TAKES) == 23


@pytest.mark.parametrize("name", TAKES)
def test_one_sampled_training_step(name, zoo_data, s3rec_pretrained):  # noqa: F811
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    model = zoo.plugin(softmax_negatives=8)
    assert model.training_objective is not None
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = zoo.loss(model)
    assert torch.isfinite(loss)
    assert torch.equal(loss, zoo.loss(model))  # same seed, same negatives and dropout: same number
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())


#: regularisers large enough to matter (RecBole's defaults are ~1e-6 of the loss, or 0)
_REGULARISED = {"Caser": {"reg_weight": 0.1}, "NextItNet": {"reg_weight": 0.1}, "GCSAN": {"reg_weight": 1.0},
                "SHAN": {"reg_weight": [0.1, 0.1]}, "FOSSIL": {"reg_weight": 0.1},
                "HGN": {"reg_weight": [0.1, 0.1]}, "SINE": {"loss_type": "NLL"}}
_EVERY_ITEM = [(m, {}) for m in TAKES] + list(_REGULARISED.items()) + [
    ("SASRec", {"prior_mode": "windowed", "prior_windows": 3}),
    ("BERT4Rec", {"prior_mode": "windowed", "prior_windows": 3}),
    ("GRU4Rec", {"prior_tau": "learned"}),
]


@pytest.mark.parametrize("name,overrides", _EVERY_ITEM, ids=[f"{m}{'-' + '-'.join(map(str, o.values())) if o else ''}"
                                                             for m, o in _EVERY_ITEM])
def test_every_item_drawn_is_the_models_own_full_softmax(name, overrides, zoo_data, s3rec_pretrained):  # noqa: F811
    """K >= n with the uniform sampler: every item is a candidate with pi = 1, so the sampled
    loss must be the model's own training loss (RecBole's code path with the prior wrapper,
    regularisers included), row for row and window for window."""
    zoo = _zoo(name, zoo_data, s3rec_pretrained, **overrides)
    full = zoo.plugin()
    sampled = zoo.plugin(softmax_negatives=N_ITEMS + 5, softmax_sampler="uniform")
    assert full.training_objective is None
    assert torch.all(sampled.training_objective.inclusion[1:] == 1.0)
    full.train()
    sampled.train()
    own, mine = zoo.loss(full), zoo.loss(sampled)
    assert float(mine.detach()) == pytest.approx(float(own.detach()), rel=1e-6, abs=1e-6)
    if overrides in _REGULARISED.values():  # the regulariser is a visible part of the loss
        init_seed(5, True)
        with torch.no_grad():
            auxiliary = float(training_factors(sampled, zoo.train_batch).auxiliary)
        assert auxiliary > 1e-3, auxiliary


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_without_factorised_training_refuse_it_with_the_reason(name, zoo_data, s3rec_pretrained):  # noqa: F811
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    with pytest.raises(PopPriorError) as info:
        zoo.plugin(softmax_negatives=8)
    message = str(info.value)
    assert "\n" not in message and name in message and REFUSED[name] in message


@pytest.mark.parametrize("overrides,match", [
    ({"softmax_negatives": -1}, "softmax_negatives must be >= 0"),
    ({"softmax_negatives": 2.5}, "softmax_negatives must be an integer"),
    ({"softmax_sampler": "zipf"}, "softmax_sampler must be one of uniform, popularity"),
    ({"eval_score_budget_mb": 0}, "eval_score_budget_mb must be > 0"),
    ({"softmax_negatives": 8, "popprior_baseline": True}, "needs the plugin's model"),
])
def test_bad_settings_are_one_line_errors(tiny_data, overrides, match):
    with pytest.raises(PopPriorError, match=match) as info:
        Config(model="SASRec", dataset="tiny", config_dict=tiny_config(tiny_data, **overrides))
    assert "\n" not in str(info.value)


# --- known truth (docs/DESIGN.md §1, §6) --------------------------------------------------------
@pytest.mark.slow
def test_popularity_sampled_separated_model_tracks_pmi(tmp_path) -> None:
    """As tests/test_theory.py, with popularity-sampled softmax (about 8 of 30 items per batch):
    with q = p_hat and tau = 1 the logits are the bare dot product (plus -log c), and the dot
    product still estimates centred PMI."""
    settings = theory_settings(tmp_path, softmax_negatives=8, softmax_sampler="popularity")
    config = arm_config("SASRec", "synthetic", None, settings, seed=None, baseline=False, run_dir=tmp_path / "sep")
    arm = train_arm("separated", config, saved=False)
    assert arm.pipe.model.training_objective is not None
    rho, rho_pop = pmi_spearman(arm)
    assert rho >= 0.90, rho
    # and not the popularity-laden logit: the sampled model did not relearn log p
    assert rho_pop < rho, (rho_pop, rho)
