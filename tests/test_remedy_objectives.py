"""The remedies of DESIGN.md §7 through the plugin's one mixin (recbole_popprior/model/remedy_objectives.py,
``_init_ace``, the trainer's epoch hook): each option trains on SASRec and GRU4Rec; each objective
equals its formula on the model's own training factors (numpy references); Adap-tau's temperatures
after an epoch equal a hand recomputation from that epoch's rows; ACE's rows equal the ridge
autoencoder's closed form of the file; the refusals are one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_rows, write_inter
from test_model_zoo import _CACHE, N_ITEMS, TAU, Zoo, s3rec_pretrained, zoo_data  # noqa: F401  (fixtures)
from test_remedies import _newton_lambert_w, _np_directspec_plus, _unit_rows

from recbole.utils import init_seed

from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import get_model, supported_models
from recbole_popprior.model.factors import factorised_training_refusal, training_factors
from recbole_popprior.quick_start import build_config, build_pipeline

TAKES = [m for m in supported_models() if factorised_training_refusal(get_model(m)) is None]


def _zoo(name, data_path, pretrained, **overrides) -> Zoo:
    key = f"{name}-{sorted(overrides.items())}" if overrides else name
    if key not in _CACHE:
        _CACHE[key] = Zoo(name, data_path, pretrained, **overrides)
    return _CACHE[key]


def _write_table(path: Path, n_items: int, width: int = 12, seed: int = 0) -> np.ndarray:
    """An anisotropic item table in RecBole's internal order, padding row first."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_items, width)) * np.geomspace(2.0, 0.1, width) + rng.standard_normal(width)
    np.save(path, table)
    return table


class _Tiny:
    """A model of the tiny data built through Config (so _validate runs), with its first batch."""

    def __init__(self, data_path, model="SASRec", **overrides):
        settings = tiny_config(data_path, fast_loader=False, **overrides)
        self.config = Config(model=model, dataset="tiny", config_dict=settings)
        self.train_data, self.valid_data, _ = data_preparation(self.config, create_dataset(self.config))
        self.dataset = self.train_data._dataset
        self.batch = next(iter(self.train_data))
        init_seed(2020, True)
        self.model = self.config.model_class(self.config, self.dataset)


# --- every option trains ----------------------------------------------------------------------------
OPTIONS = {
    "directspec": {"prior_tau": 0.0, "remedy": "directspec", "directspec_plus": False},
    "directspec_plus": {"prior_tau": 0.0, "remedy": "directspec", "directspec_plus": True},
    "adap_tau": {"prior_tau": 0.0, "remedy": "adap_tau"},
    "resn": {"prior_tau": 0.0, "remedy": "resn"},
    "resn_sampled": {"remedy": "resn", "resn_link": "identity", "softmax_negatives": 8},
    "ace": {"prior_tau": 0.0, "ace_init": None},
}


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_one_step(tiny_data, tmp_path, model, option):
    overrides = dict(OPTIONS[option])
    if option == "ace":
        overrides["ace_init"] = str(tmp_path / "table.npy")
        _write_table(tmp_path / "table.npy", 31)
    tiny = _Tiny(tiny_data, model, **overrides)
    net = tiny.model
    assert (net.training_objective is None) == (option == "ace")
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = net.calculate_loss(tiny.batch)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in net.named_parameters())
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net.full_sort_predict(next(iter(tiny.valid_data))[0])[:, 1:]).all()


# --- DirectSpec -------------------------------------------------------------------------------------
@pytest.mark.parametrize("plus", [True, False])
def test_directspec_objective_is_the_released_loss_on_the_models_factors(zoo_data, s3rec_pretrained, plus):  # noqa: F811
    """calculate_loss = mean -log sigmoid(h'' . e''), the filter over the batch's contexts and over its
    target rows (numpy; shrink included), plus the model's own regulariser (Caser's is large here)."""
    for name in ("SASRec", "Caser"):
        zoo = _zoo(name, zoo_data, s3rec_pretrained, **({"reg_weight": 0.1} if name == "Caser" else {}))
        model = zoo.plugin(prior_tau=0.0, remedy="directspec", directspec_plus=plus, directspec_alpha=0.8)
        model.eval()
        with torch.no_grad():
            loss = float(model.calculate_loss(zoo.train_batch))
            parts = training_factors(model, zoo.train_batch)
        H, E = parts.H.detach().double().numpy(), parts.E.detach().double().numpy()
        pos = parts.targets.numpy()

        def filt(X):
            if plus:
                return _np_directspec_plus(X, 0.8, 3.0, 0.03)
            Xn = _unit_rows(X)
            out = Xn - 0.8 / len(X) * Xn @ Xn.T @ Xn
            return out * np.linalg.norm(out, axis=1, keepdims=True) * 0.03

        d = np.sum(filt(H) * filt(E[pos]), axis=1)
        expected = -np.mean(np.log(1.0 / (1.0 + np.exp(-d)))) + float(parts.auxiliary)
        assert loss == pytest.approx(expected, rel=1e-5)


# --- ReSN -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TAKES)
def test_resn_weight_zero_is_the_models_own_loss(name, zoo_data, s3rec_pretrained):  # noqa: F811
    """ReSN's softmax on the factorised path is the model's own training loss (regularisers included),
    with the prior of the zoo's tau: the penalty is the only thing the remedy adds."""
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    own, resn = zoo.plugin(), zoo.plugin(remedy="resn", resn_weight=0.0)
    assert own.training_objective is None and resn.training_objective is not None
    own.train()
    resn.train()
    assert float(zoo.loss(resn).detach()) == pytest.approx(float(zoo.loss(own).detach()), rel=1e-6, abs=1e-6)


def _np_resn_penalty(Z: np.ndarray, link: str) -> float:
    """The released estimate: one power step from the all-ones vector, ||Y q||^2 / B."""
    if link == "sigmoid":
        Y = 1.0 / (1.0 + np.exp(-Z))
    elif link == "softmax":
        Y = np.exp(Z - Z.max(axis=1, keepdims=True))
        Y /= Y.sum(axis=1, keepdims=True)
    else:
        Y = Z
    q = Y.sum(axis=0)
    q /= np.linalg.norm(q)
    return float(np.sum((Y @ q) ** 2) / len(Y))


@pytest.mark.parametrize("link", ["sigmoid", "softmax", "identity"])
def test_resn_penalty_is_on_the_learned_logits_not_the_prior(zoo_data, s3rec_pretrained, link):  # noqa: F811
    """loss(w) - loss(0) = w * penalty(H E[1:]^T): the prior (tau = 0.8 here) is outside the penalty."""
    zoo = _zoo("SASRec", zoo_data, s3rec_pretrained)
    weight = 0.5
    with_penalty = zoo.plugin(remedy="resn", resn_weight=weight, resn_link=link)
    without = zoo.plugin(remedy="resn", resn_weight=0.0, resn_link=link)
    for m in (with_penalty, without):
        m.eval()
    with torch.no_grad():
        delta = float(with_penalty.calculate_loss(zoo.train_batch) - without.calculate_loss(zoo.train_batch))
        parts = training_factors(without, zoo.train_batch)
    Z = parts.H.detach().double().numpy() @ parts.E.detach().double().numpy()[1:].T
    assert delta == pytest.approx(weight * _np_resn_penalty(Z, link), rel=1e-4)
    prior = TAU * without.log_prior.double().numpy()[1:]
    assert abs(delta - weight * _np_resn_penalty(Z + prior, link)) > 1e-3 * abs(delta)


# --- Adap-tau ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    """Dataset ``tiny`` with users of 5 to 14 interactions (the active-user filter has work to do)."""
    root = tmp_path_factory.mktemp("uneven")
    rows = [r for r in tiny_rows(n_users=60, length=14, seed=3) if r[2] % 1000 < 5 + r[0] % 10]
    write_inter(root / "tiny" / "tiny.inter", rows)
    return root


@pytest.mark.parametrize("uneven", [True, False])
def test_adap_tau_temperatures_after_an_epoch_match_a_hand_recomputation(tiny_data, uneven_data, uneven):
    """One epoch of Adap-tau steps; then t0 and every t_u recomputed in numpy from that epoch's rows
    (their contexts, tables and users as each step saw them) by the formulas of DESIGN §7.2, with
    Lambert's W by Newton's method (not scipy). The gap runs over the users with more rows than the
    0.2 quantile, or over every user when all have as many (the even tiny data)."""
    rho, quantile = 0.5, 0.2
    tiny = _Tiny(uneven_data if uneven else tiny_data, prior_tau=0.0, remedy="adap_tau", adap_tau_warmup_epochs=0,
                 adap_tau_rho=rho, adap_tau_active_quantile=quantile, train_batch_size=64)
    model, objective = tiny.model, tiny.model.training_objective
    seen_rows = []
    inner = objective.loss

    def spy(m, batch):
        seen_rows.append((batch.H.detach().double().numpy(), batch.E.detach().double().numpy(),
                          batch.targets.numpy(), batch.users.numpy()))
        return inner(m, batch)

    objective.loss = spy
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    model.on_epoch_start(0)
    n_items = model.log_prior.shape[0] - 1
    assert float(objective.t0) == pytest.approx(0.7 / np.log(n_items / 2))  # first epoch: the warm-up gap
    for batch in tiny.train_data:
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # mean_all uses the item table as the epoch's last step left it: here the embedding weight after
    # its last update (the objective keeps a reference, not a copy per step)
    last_table = model.item_embedding.weight.detach().double().numpy().copy()
    model.on_epoch_start(1)
    assert len(seen_rows) > 1

    counts = np.bincount(tiny.dataset.inter_feat["user_id"].numpy(), minlength=tiny.dataset.user_num)
    active = counts > np.quantile(counts[counts > 0], quantile)
    assert active.any() == uneven and (active.sum() < (counts > 0).sum())
    if not uneven:
        active = counts > 0
    cos_pos, h_dirs, plain, users = [], [], [], []
    for H, E, pos, u in seen_rows:
        h, e = _unit_rows(H), _unit_rows(E[1:])  # E[0] is padding (a zero row)
        s = h @ e.T  # [rows, real items]; column j is item j + 1
        cos_pos.append(s[np.arange(len(pos)), pos - 1])
        for r in range(len(pos)):
            others = np.delete(s[r], pos[r] - 1)
            plain.append(-s[r, pos[r] - 1] + np.log(np.exp(others).sum()))
        h_dirs.append(h)
        users.append(u)
    cos_pos, h_dirs, users, plain = np.concatenate(cos_pos), np.vstack(h_dirs), np.concatenate(users), np.array(plain)
    act = active[users]
    item_dir = _unit_rows(last_table[1:]).mean(axis=0)
    gap = cos_pos[act].mean() - h_dirs[act].mean(axis=0) @ item_dir
    assert gap > 0  # the measured gap, not the warm-up fallback
    t0 = gap / np.log(n_items / 2)
    assert float(objective.t0) == pytest.approx(t0, rel=1e-9)

    mean_loss = {u: plain[users == u].mean() for u in np.unique(users)}
    base = np.mean(list(mean_loss.values()))
    got = objective.t_user.numpy()
    for u in range(tiny.dataset.user_num):
        if u not in mean_loss:
            assert got[u] == pytest.approx(t0, rel=1e-9)
            continue
        x = np.clip((mean_loss[u] - base) / rho, -1 / np.e, 1000.0)
        w = -1.0 if x <= -1 / np.e else _newton_lambert_w(x)
        assert got[u] == pytest.approx(t0 * np.exp(w), rel=2e-5)  # the model sums float32 losses
    assert np.ptp(got[list(mean_loss)]) > 0  # the users' temperatures differ


def test_adap_tau_serves_and_measures_the_scaled_cosine(tiny_data):
    """Serving = h^ . e^ / t0 (+ beta log p_hat), the cosines computed here from the encoder and the
    item table; the factors reproduce the learned scores; t0 is in the state dict, so the best checkpoint serves with its own t0."""
    tiny = _Tiny(tiny_data, prior_tau=0.0, prior_beta=0.6, remedy="adap_tau")
    model = tiny.model
    model.training_objective.t0.fill_(0.25)
    interaction = next(iter(tiny.valid_data))[0]
    model.eval()
    with torch.no_grad():
        served = model.full_sort_predict(interaction).double()
        learned = model.popprior_learned_scores(interaction).double()
        H, E = model.popprior_factors(interaction)
        Hn = model.forward(interaction["item_id_list"], interaction["item_length"]).double()
        En = model.item_embedding.weight.double()
    cos = (Hn / Hn.norm(dim=1, keepdim=True)) @ (En / En.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    assert torch.allclose(learned[:, 1:], cos[:, 1:] / 0.25, atol=1e-5)
    assert torch.allclose(served[:, 1:], learned[:, 1:] + 0.6 * model.log_prior[1:].double(), atol=1e-5)
    assert torch.allclose((H @ E.T).double(), learned, atol=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert float(state["training_objective.t0"]) == 0.25
    model.training_objective.t0.fill_(1.0)
    model.load_state_dict(state)
    assert float(model.training_objective.t0) == 0.25


def test_trainer_calls_the_epoch_hook_before_every_epoch(tiny_data, tmp_path):
    config = build_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, fast_loader=False, epochs=3, prior_tau=0.0, remedy="adap_tau", run_dir=str(tmp_path / "run")))
    pipe = build_pipeline(config, log=False)
    calls = []
    original = pipe.model.on_epoch_start
    pipe.model.on_epoch_start = lambda epoch: (calls.append((epoch, pipe.model.training_objective.epoch_last_E is None)),
                                               original(epoch))
    pipe.trainer.fit(pipe.train_data, pipe.valid_data, saved=False, show_progress=False)
    # each call sees the previous epoch's rows (none before the first)
    assert calls == [(0, True), (1, False), (2, False)]


# --- ACE --------------------------------------------------------------------------------------------
def _closed_form_gram(real: np.ndarray, lam: float, dim: int) -> np.ndarray:
    """Phi_k Phi_k^T for the top-dim part of Phi = U diag(s / sqrt(s^2 + lam)) (sign-free reference)."""
    U, s, _ = np.linalg.svd(real, full_matrices=False)
    Phi = U[:, :dim] * (s[:dim] / np.sqrt(s[:dim] ** 2 + lam))
    return Phi @ Phi.T


@pytest.mark.parametrize("layout", ["ordered_with_padding", "ordered_real_only", "keyed_npz", "keyed_structured"])
def test_ace_init_rows_are_the_reshaped_file(tiny_data, tmp_path, layout):
    lam = 0.3
    plain = _Tiny(tiny_data, prior_tau=0.0)
    tokens = list(plain.dataset.field2id_token["item_id"])
    n_items = len(tokens)
    table = _write_table(tmp_path / "ordered.npy", n_items, width=12, seed=4)
    table[0] = 50.0  # the padding row of the file is never read
    path = tmp_path / "ordered.npy"
    if layout == "ordered_with_padding":
        np.save(path, table)
    elif layout == "ordered_real_only":
        np.save(path, table[1:])
    else:  # rows keyed by token, shuffled, with extra tokens
        order = np.random.default_rng(0).permutation(np.arange(1, n_items))
        keys = np.array([tokens[i] for i in order] + ["x1", "x2"])
        rows = np.vstack([table[order], np.ones((2, 12))])
        if layout == "keyed_npz":
            path = tmp_path / "keyed.npz"
            np.savez(path, tokens=keys, embeddings=rows)
        else:
            path = tmp_path / "keyed.npy"
            rec = np.zeros(len(keys), dtype=[("token", "U8"), ("embedding", "f8", (12,))])
            rec["token"], rec["embedding"] = keys, rows
            np.save(path, rec)
    tiny = _Tiny(tiny_data, prior_tau=0.0, ace_init=str(path), ace_lambda=lam)
    got = tiny.model.item_embedding.weight.detach().double().numpy()
    assert got.shape[1] == 8  # the model's width: the top 8 of the file's 12 directions
    np.testing.assert_allclose(got[1:] @ got[1:].T, _closed_form_gram(table[1:], lam, 8), atol=1e-5)
    flip = got[1:][np.abs(got[1:]).argmax(axis=0), np.arange(8)]
    assert np.all(flip > 0)  # each column's sign: its largest entry positive
    # padding keeps RecBole's own init (same seed, no ace_init)
    assert torch.equal(tiny.model.item_embedding.weight[0], plain.model.item_embedding.weight[0])


def test_ace_init_covers_every_item_table_and_leaves_extra_rows(zoo_data, s3rec_pretrained, tmp_path):  # noqa: F811
    _write_table(tmp_path / "t.npy", N_ITEMS + 1, width=10)
    hgn = _zoo("HGN", zoo_data, s3rec_pretrained).plugin(ace_init=str(tmp_path / "t.npy"), ace_lambda=0.0)
    assert torch.equal(hgn.item_embedding.weight[1:], hgn.item_embedding_for_prediction.weight[1:])
    flat = np.linalg.svd(hgn.item_embedding.weight[1:].detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(flat, np.ones(8), rtol=1e-5)  # lambda = 0: the whitened table
    zoo = _zoo("BERT4Rec", zoo_data, s3rec_pretrained)
    bert, plain = zoo.plugin(ace_init=str(tmp_path / "t.npy")), zoo.plugin()
    assert bert.item_embedding.weight.shape[0] == N_ITEMS + 2  # the mask token's row keeps RecBole's init
    assert torch.equal(bert.item_embedding.weight[-1], plain.item_embedding.weight[-1])
    assert not torch.equal(bert.item_embedding.weight[1:-1], plain.item_embedding.weight[1:-1])


# --- one-line refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("model,overrides,match", [
    ("SASRec", {"remedy": "directspec"}, "remedy: directspec has its own training logits.*prior_tau: 0"),
    ("SASRec", {"remedy": "adap_tau", "prior_tau": "learned"}, "prior_tau: 0"),
    ("SASRec", {"remedy": "adap_tau", "prior_tau": 0.0, "softmax_negatives": 5}, "does not take softmax_negatives"),
    ("SASRec", {"remedy": "resn", "softmax_negatives": 5}, "needs resn_link: identity"),
    ("SASRec", {"remedy": "resn", "loss_type": "BPR"}, "use loss_type: CE"),
    ("SASRec", {"remedy": "resn", "popprior_baseline": True}, "need the plugin's model"),
    ("SASRec", {"ace_init": "x.npy", "popprior_baseline": True}, "ace_init: no such file: x.npy"),
    ("SASRec", {"ace_init": __file__, "popprior_baseline": True}, "need the plugin's model"),
    ("SASRec", {"remedy": "dirspec"}, "remedy must be one of"),
    ("SASRec", {"resn_link": "tanh"}, "resn_link must be one of"),
    ("SASRec", {"adap_tau_base": "median"}, "adap_tau_base"),
    ("SASRec", {"directspec_alpha": 0}, "directspec_alpha must be > 0"),
    ("SASRec", {"loss_type": "BPR", "softmax_negatives": 4}, "does not apply to a BPR loss"),
    ("SASRec", {"loss_type": "BPR", "train_neg_sample_args": None}, "needs a sampled negative"),
    ("FPMC", {"remedy": "resn"}, "FPMC cannot train with remedy: resn: it trains a pairwise BPR loss only"),
    ("RepeatNet", {"remedy": "adap_tau", "prior_tau": 0.0}, "RepeatNet cannot train with remedy: adap_tau"),
    ("FPMC", {"ace_init": __file__}, "FPMC cannot take ace_init"),
    ("CORE", {"loss_type": "BPR"}, "CORE cannot train with loss_type BPR"),
    ("SASRec", {"adap_tau_base": 1.5}, "adap_tau_base must be mean or a quantile"),
])
def test_bad_combinations_are_one_line_config_errors(tiny_data, model, overrides, match):
    with pytest.raises(PopPriorError, match=match) as info:
        Config(model=model, dataset="tiny", config_dict=tiny_config(tiny_data, **overrides))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,overrides,match", [
    ("RepeatNet", {"remedy": "resn"}, "RepeatNet cannot train with remedy: resn: its scores mix"),
    ("GRU4RecCPR", {"remedy": "adap_tau", "prior_tau": 0.0}, "GRU4RecCPR cannot train with remedy: adap_tau"),
    ("FEARec", {"remedy": "directspec", "prior_tau": 0.0}, "FEARec cannot train with remedy: directspec"),
    ("FPMC", {"ace_init": "t.npy"}, "FPMC cannot take ace_init"),
    ("S3Rec", {"ace_init": "t.npy"}, "S3Rec cannot take ace_init in the finetune stage"),
    ("SASRec", {"ace_init": "missing.npy"}, "ace_init: no such file"),
    ("SASRec", {"ace_init": "short.npy"}, "ace_init: .*has 5 rows"),
])
def test_models_that_cannot_take_an_option_refuse_it_in_one_line(name, overrides, match, tmp_path, monkeypatch,
                                                                  zoo_data, s3rec_pretrained):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    _write_table(tmp_path / "t.npy", N_ITEMS + 1)
    np.save(tmp_path / "short.npy", np.ones((5, 8)))
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    with pytest.raises(PopPriorError, match=match) as info:
        zoo.plugin(**overrides)
    assert "\n" not in str(info.value)
