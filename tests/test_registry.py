"""The model registry (docs/DESIGN.md §1.1): one record per model, found by the class's MRO.

A user's ``class MySASRec(SASRec)`` gets SASRec's record and trains, serves and measures energy
like SASRec (real RecBole data and trainer, checked against dense numpy references); a model
defined here and registered in one call trains through the mixin with the full softmax, the
sampled softmax and BPR; the README's model table is the registry's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from recbole.model.sequential_recommender import BERT4Rec, DIN, SASRec
from torch import nn

from conftest import tiny_config
from recbole_popprior import register_model, run_recbole_popprior
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import PriorSeparatedMixin, get_model, record_of, special_cases, unregister_model
from recbole_popprior.model.registry import markdown_table, recbole_model_name, records
from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test

ROOT = Path(__file__).resolve().parent.parent


class MySASRec(SASRec):
    """A user's SASRec with one extra layer on the sequence output (a common research pattern)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.extra = nn.Linear(self.hidden_size, self.hidden_size)

    def forward(self, item_seq, item_seq_len):
        return self.extra(super().forward(item_seq, item_seq_len))


class TinyPool(SequentialRecommender):
    """A model of the test's own: mean of the history's embeddings through one linear layer,
    scored against its own item table ``items`` (not ``item_embedding``)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = config["embedding_size"]
        self.items = nn.Embedding(self.n_items, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.loss_type = config["loss_type"]
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()

    def forward(self, item_seq, item_seq_len):
        emb = self.items(item_seq) * (item_seq > 0).unsqueeze(-1)
        return self.mix(emb.sum(1) / item_seq_len.clamp_min(1).unsqueeze(1))

    def calculate_loss(self, interaction):
        h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos = interaction[self.POS_ITEM_ID]
        if self.loss_type == "BPR":
            neg = interaction[self.NEG_ITEM_ID]
            return self.loss_fct((h * self.items(pos)).sum(-1), (h * self.items(neg)).sum(-1))
        return self.loss_fct(h @ self.items.weight.T, pos)

    def predict(self, interaction):
        h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (h * self.items(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]) @ self.items.weight.T


@pytest.fixture()
def tiny_pool():
    """TinyPool registered for the test (one call), and removed again afterwards."""
    record = register_model(
        TinyPool, note="test model: mean-pooled history, its own item table",
        factors=lambda m, i: (m.forward(i[m.ITEM_SEQ], i[m.ITEM_SEQ_LEN]), m.items.weight), ace_tables=("items",))
    yield record
    unregister_model(TinyPool)


def _settings(tiny_data, tmp_path, **overrides) -> dict:
    return tiny_config(tiny_data, output=str(tmp_path), hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                       metrics=["MRR", "PopEnergy"], energy_permutations=0, **overrides)


def _batch(loader):
    return next(iter(loader))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _ce(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy by hand (float64); ``-inf`` columns (padding) drop out."""
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(targets)), targets]))


def _pop_dir_frac(Z: np.ndarray, log_prior: np.ndarray) -> float:
    """DESIGN §3 by hand: the share of the item-centred learned scores along the popularity direction."""
    Zc = Z[:, 1:] - Z[:, 1:].mean(axis=1, keepdims=True)
    c = log_prior[1:] - log_prior[1:].mean()
    s = Zc @ (c / np.linalg.norm(c))
    return float(s @ s / np.sum(Zc**2))


# --- lookup by class -----------------------------------------------------------------------------
def test_a_subclass_gets_its_parents_record_and_a_prior_separated_class():
    assert record_of(MySASRec) is record_of(SASRec) is record_of(get_model("SASRec"))
    cls = get_model(MySASRec)
    assert issubclass(cls, PriorSeparatedMixin) and issubclass(cls, MySASRec) and cls.__name__ == "MySASRec"
    assert get_model(MySASRec) is cls and get_model(cls) is cls  # one class per model
    assert get_model(MySASRec, baseline=True) is MySASRec and get_model(cls, baseline=True) is MySASRec
    assert get_model("sasrec") is get_model(SASRec)  # a RecBole model by name or by class
    # a subclass of a model with a special class takes that class's overrides, then its own network
    my_bert = type("MyBERT4Rec", (BERT4Rec,), {})
    cls = get_model(my_bert)
    assert record_of(my_bert) is record_of(BERT4Rec)
    assert cls.__mro__[1:5] == (special_cases.BERT4Rec, PriorSeparatedMixin, my_bert, BERT4Rec)


def test_unregistered_and_refused_classes_are_one_line_errors():
    class Unknown(nn.Module):
        pass

    with pytest.raises(PopPriorError, match="Unknown is not a registered model") as info:
        get_model(Unknown)
    assert "\n" not in str(info.value)
    with pytest.raises(PopPriorError, match="DIN cannot take a popularity prior: DIN is a click-through-rate"):
        get_model(type("MyDIN", (DIN,), {}))
    for bad in ({"pairwise": "sometimes"}, {"pairwise": "none"}, {"ace_tables": ()}, {"special_class": SASRec}):
        with pytest.raises(PopPriorError):
            register_model(type("Bad", (SequentialRecommender,), {}), **bad)
    with pytest.raises(PopPriorError, match="registered already"):
        register_model(SASRec)
    assert "Bad" not in [r.name for r in records()]


def test_the_readme_model_table_is_the_registrys():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- model table: .*? -->\n(.*?)\n<!-- end of model table -->", readme, re.S)
    assert found, "README.md has no generated model table"
    assert found.group(1).strip() == markdown_table()
    # and the README's list of --model names is the supported records'
    assert all(f"| {r.name} |" in found.group(1) for r in records())


# --- a user's subclass of SASRec -------------------------------------------------------------------
def test_a_users_sasrec_subclass_trains_serves_and_measures_energy_like_sasrec(tiny_data, tmp_path):
    config = build_config(MySASRec, "tiny", config_dict=_settings(tiny_data, tmp_path, epochs=2))
    assert config["model"] == "MySASRec" and config["hidden_act"] == "gelu"  # SASRec's yaml defaults
    assert recbole_model_name(config) == "SASRec"  # RecBole's trainer and dataset class by that name
    pipe = build_pipeline(config, log=False)
    model = pipe.model
    assert isinstance(model, MySASRec) and isinstance(model, PriorSeparatedMixin)
    lp = _np(model.log_prior)

    # training: CE over H E^T + tau log p_hat, H through the extra layer (numpy reference)
    model.train()
    batch = _batch(pipe.train_data)
    with torch.no_grad():
        H = _np(model.forward(batch["item_id_list"], batch["item_length"]))
        E = _np(model.item_embedding.weight)
        without_extra = _np(SASRec.forward(model, batch["item_id_list"], batch["item_length"]))
        loss = float(model.calculate_loss(batch))
    targets = batch["item_id"].numpy()
    reference, plain_sasrec = _ce(H @ E.T + lp, targets), _ce(without_extra @ E.T + lp, targets)
    assert loss == pytest.approx(reference, rel=1e-6)
    assert abs(loss - plain_sasrec) > 100 * abs(loss - reference)  # the extra layer is in the loss
    before = model.extra.weight.detach().clone()
    result = train_and_test(pipe, saved=False)
    assert not torch.equal(before, model.extra.weight)  # the user's layer is trained

    # serving: H E^T + beta log p_hat
    model.eval()
    test = _batch(pipe.test_data)[0]
    with torch.no_grad():
        H = _np(model.forward(test["item_id_list"], test["item_length"]))
        E = _np(model.item_embedding.weight)
        served = _np(model.full_sort_predict(test))
    np.testing.assert_allclose(served[:, 1:], (H @ E.T + lp)[:, 1:], rtol=1e-5, atol=1e-5)

    # energy: the collector's factorised path (the record's (H, E)) against dense numpy
    calls = []
    original = model.popprior_factors

    def spying(interaction):
        calls.append(original(interaction))
        return calls[-1]

    model.popprior_factors = spying
    measured = pipe.trainer.evaluate(pipe.test_data, load_best_model=False)
    assert calls and all(pair is not None for pair in calls)
    # SASRec's (H, E): H through the extra layer (the last call scores the batch's last chunk of contexts)
    last = _np(calls[-1][0])
    np.testing.assert_allclose(last, H[len(H) - len(last):], rtol=1e-6)
    Z, rows = [], 0
    with torch.no_grad():
        for interaction, *_ in pipe.test_data:
            Z.append(_np(model.forward(interaction["item_id_list"], interaction["item_length"])) @ E.T)
            rows += len(interaction)
    assert measured["pop_contexts"] == rows == 60
    assert measured["pop_dir_frac"] == pytest.approx(_pop_dir_frac(np.concatenate(Z), lp), rel=1e-6)
    assert measured["mrr@10"] == result["test_result"]["mrr@10"]


def test_the_python_api_takes_a_class(tiny_data, tmp_path):
    result = run_recbole_popprior(model=MySASRec, dataset="tiny", config_dict=_settings(tiny_data, tmp_path),
                                  saved=False)
    assert result["model"] == "MySASRec" and np.isfinite(result["test_result"]["pop_dir_frac"])
    assert Path(result["run_dir"]).name.startswith("MySASRec-tiny-")


# --- a model registered in one call --------------------------------------------------------------
def _tiny_pipeline(tiny_data, tmp_path, **overrides):
    # a model of one's own has no RecBole yaml: its settings come with the config
    config = build_config(TinyPool, "tiny", config_dict=_settings(tiny_data, tmp_path, **{"loss_type": "CE", **overrides}))
    return build_pipeline(config, log=False)


@pytest.mark.parametrize("mode", ["full", "sampled", "bpr"])
def test_a_registered_model_trains_through_the_mixin(tiny_pool, tiny_data, tmp_path, mode):
    overrides = {"full": {}, "sampled": {"softmax_negatives": 100},
                 "bpr": {"loss_type": "BPR"}}  # RecBole's default: one uniform negative per row
    pipe = _tiny_pipeline(tiny_data, tmp_path, epochs=2, prior_tau=1.0, **overrides[mode])
    model = pipe.model
    assert isinstance(model, TinyPool) and record_of(model) is tiny_pool
    assert (model.training_objective is not None) == (mode == "sampled")
    model.train()
    batch = _batch(pipe.train_data)
    with torch.no_grad():
        H = _np(model.forward(batch["item_id_list"], batch["item_length"]))
        E, lp = _np(model.items.weight), _np(model.log_prior)
        loss = float(model.calculate_loss(batch))
    pos = batch["item_id"].numpy()
    if mode == "bpr":  # RecBole's BPRLoss with tau log p_hat on both scores (DESIGN §6.2)
        neg = batch["neg_item_id"].numpy()
        diff = (H * E[pos]).sum(1) + lp[pos] - (H * E[neg]).sum(1) - lp[neg]
        expected = float(np.mean(-np.log(1e-10 + 1 / (1 + np.exp(-diff)))))
    else:  # sampled with K >= n items: every item is a candidate, exactly the full softmax
        expected = _ce(H @ E.T + lp, pos)
    assert loss == pytest.approx(expected, rel=1e-5)
    before = model.items.weight.detach().clone()
    result = train_and_test(pipe, saved=False)
    assert not torch.equal(before, model.items.weight)  # its own table is what trains
    assert np.isfinite(result["test_result"]["mrr@10"]) and np.isfinite(result["test_result"]["pop_dir_frac"])


def test_a_registered_model_takes_sampled_softmax_below_the_catalogue(tiny_pool, tiny_data, tmp_path):
    pipe = _tiny_pipeline(tiny_data, tmp_path, softmax_negatives=5)
    result = train_and_test(pipe, saved=False)
    assert np.isfinite(result["best_valid_score"])
