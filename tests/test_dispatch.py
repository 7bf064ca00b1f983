"""The three implicit dispatch points (docs/DESIGN.md §1.1), each pinned against the failure the
obvious alternative would have:

(a) the prior is added when the logits' width is the item count, not to every ``loss_fct`` call;
(b) the window ids and BPR pairs are set only around ``super().calculate_loss``;
(c) ``reuse_forward`` shadows ``forward`` on the instance, not on the class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.model.sequential_recommender import SASRec
from torch import nn

from conftest import tiny_config
from recbole_popprior.model import get_model, prior_term, record_of
from recbole_popprior.quick_start import build_config, build_pipeline
from recbole_popprior.trainer import reuse_forward


class ContrastiveSASRec(SASRec):
    """A user's SASRec that adds an in-batch contrastive term through the same ``loss_fct``."""

    def calculate_loss(self, interaction):
        h = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        rows = torch.arange(h.shape[0], device=h.device)
        return super().calculate_loss(interaction) + self.loss_fct(h @ h.T / 0.1, rows)


def _pipeline(model, tiny_data, tmp_path, **overrides):
    settings = tiny_config(tiny_data, output=str(tmp_path), hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                           **overrides)
    return build_pipeline(build_config(model, "tiny", config_dict=settings), log=False)


class _Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, input, target, *args, **kwargs):
        self.inputs.append(input.detach().clone())
        return self.inner(input, target, *args, **kwargs)


# --- (a) the width decides -----------------------------------------------------------------------
def test_the_prior_goes_to_the_item_softmax_only_not_to_an_auxiliary_call(tiny_data, tmp_path):
    pipe = _pipeline(ContrastiveSASRec, tiny_data, tmp_path)
    model = pipe.model.train()
    assert record_of(model) is record_of(SASRec)
    recorder = _Recorder(model.loss_fct.inner)
    model.loss_fct.inner = recorder
    batch = next(iter(pipe.train_data))[:16]  # 16 rows, 31 item columns
    with torch.no_grad():
        model.calculate_loss(batch)
        H = model.forward(batch["item_id_list"], batch["item_length"]).double().numpy()
    E, lp = model.item_embedding.weight.detach().double().numpy(), model.log_prior.double().numpy()
    contrastive, item_softmax = sorted(recorder.inputs, key=lambda x: x.shape[1])
    assert item_softmax.shape == (16, 31) and contrastive.shape == (16, 16)
    np.testing.assert_allclose(item_softmax.double().numpy()[:, 1:], (H @ E.T + lp)[:, 1:], rtol=1e-5, atol=1e-5)
    # the auxiliary call reaches the loss untouched ...
    np.testing.assert_allclose(contrastive.double().numpy(), H @ H.T / 0.1, rtol=1e-5, atol=1e-4)
    # ... where adding the prior to every call (the obvious alternative) cannot even be computed
    with pytest.raises(RuntimeError):
        contrastive + prior_term(model.log_prior, 1.0)


# --- (b) the side channel lives for one call -----------------------------------------------------
@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_the_side_channel_is_set_for_the_call_and_cleared_even_when_it_fails(tiny_data, tmp_path, monkeypatch,
                                                                             loss_type):
    pipe = _pipeline("SASRec", tiny_data, tmp_path, prior_mode="windowed", prior_windows=3, loss_type=loss_type)
    model = pipe.model.train()
    batch = next(iter(pipe.train_data))
    seen = {}

    def failing(self, interaction):
        seen["windows"], seen["pairs"] = self._train_window_ids, self._train_pairs
        raise ValueError("out of memory, say")

    monkeypatch.setattr(SASRec, "calculate_loss", failing)
    with pytest.raises(ValueError):
        model.calculate_loss(batch)
    assert torch.equal(seen["windows"], model.prior_window_ids(batch))  # set during the call
    if loss_type == "BPR":
        assert torch.equal(seen["pairs"][0], batch["item_id"]) and torch.equal(seen["pairs"][1], batch["neg_item_id"])
    assert model._train_window_ids is None and model._train_pairs is None  # and gone after it

    # what a leftover would do to the next call (the alternative without ``finally``)
    model._train_window_ids = seen["windows"]
    if loss_type == "CE":
        with pytest.raises(RuntimeError, match="cannot align"):
            model.add_training_prior(torch.zeros(len(batch) - 1, 31))
    else:
        model._train_pairs = seen["pairs"]
        scores = torch.zeros(len(batch))
        pos, neg = model.add_pairwise_prior(scores, scores)
        assert not torch.equal(pos, scores)  # the previous batch's priors added to unrelated scores
    model._train_window_ids = model._train_pairs = None
    scores = torch.zeros(len(batch))
    assert all(torch.equal(s, scores) for s in model.add_pairwise_prior(scores, scores))


# --- (c) the forward cache belongs to one instance -----------------------------------------------
def test_reuse_forward_shadows_one_instance_not_its_class(tiny_data, tmp_path):
    first = _pipeline("SASRec", tiny_data, tmp_path / "a", seed=1)
    second = _pipeline("SASRec", tiny_data, tmp_path / "b", seed=2)
    a, b = first.model.eval(), second.model.eval()
    assert type(a) is type(b) is get_model("SASRec")
    batch = next(iter(first.test_data))[0]
    seq, length = batch["item_id_list"], batch["item_length"]
    with torch.no_grad():
        own_b = b.forward(seq, length)
        with reuse_forward(a):
            cached = a.forward(seq, length)
            assert a.forward(seq, length) is cached
            # the other model of the same class runs its own network on the very same tensors
            answered = b.forward(seq, length)
    assert torch.equal(answered, own_b) and not torch.allclose(answered, cached)
