"""Pairwise prior separation: RecBole's BPR loss with the prior on both sides (docs/DESIGN.md §6.2).

    loss = -log(gamma + sigmoid((s_pos + tau log p_hat(pos)) - (s_neg + tau log p_hat(neg))))

RecBole's BPR models score the row's positive and its sampled negative and call
``self.loss_fct(pos_score, neg_score)`` (a :class:`recbole.model.loss.BPRLoss`); TransRec calls
``self.bpr_loss``. :class:`PairwisePriorLoss` wraps that call: the mixin sets the batch's
positive and negative item ids (and window ids) for the duration of ``calculate_loss``, and the
wrapper adds ``tau log p_hat`` to each score, so RecBole's own scores, regularisers and
reduction are kept. Which models train BPR (optionally, only, or not at all) is each model's
record's ``pairwise`` (:mod:`.registry`). BERT4Rec computes its BPR inline and has its own code in
:mod:`~recbole_popprior.model.special_cases`. Serving is unchanged (``+ beta log p_hat``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn


class PairwisePriorLoss(nn.Module):
    """Wraps a model's BPR loss: ``inner(s_pos + tau log p_hat(pos), s_neg + tau log p_hat(neg))``.

    The owner supplies the prior terms (:meth:`PriorSeparatedMixin.add_pairwise_prior`); a call
    whose scores do not line up with the batch's pairs (none is made by RecBole's models) passes
    through untouched, as :class:`~recbole_popprior.model.mixin.PriorLoss` does for auxiliary losses.
    """

    def __init__(self, inner: Any, owner: nn.Module):
        super().__init__()
        self.inner = inner
        # a weak reference: registering the owner as a submodule would create a cycle
        self._owner = weakref.ref(owner)

    def forward(self, pos_score: torch.Tensor, neg_score: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner = self._owner()
        if owner is not None:
            pos_score, neg_score = owner.add_pairwise_prior(pos_score, neg_score)
        return self.inner(pos_score, neg_score, *args, **kwargs)


__all__ = ["PairwisePriorLoss"]
