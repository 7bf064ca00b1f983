"""The factorised training path: a training objective computed from ``(H, E)`` (docs/DESIGN.md §6).

When an objective is configured (``softmax_negatives > 0`` or a ``remedy``), the mixin's
``calculate_loss`` does not run the model's own loss, which builds ``[B, n_items]`` logits.
It asks :func:`recbole_popprior.model.factors.training_factors` for the training rows'
contexts ``H``, the output item table ``E`` and the targets, and hands them to a
:class:`TrainingObjective`. Sampled softmax (:mod:`~recbole_popprior.model.sampled_softmax`) is
the first; the other remedies of DESIGN §7 (DirectSpec, Adap-tau, ReSN,
:mod:`~recbole_popprior.model.remedy_objectives`) implement the same ``loss(model, batch)``.
Which objective runs is decided in one place, :func:`recbole_popprior.model.mixin.training_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is a half type (an autocast matmul's bf16/fp16 output), else as it is.

    Where a loss adds the prior or the logQ term to logits, it adds them to this: ``log p_hat``
    near -17 keeps 3 significant digits in bf16 (-17.322 becomes -17.375), so the sum must be
    formed in float32 whatever the autocast dtype (docs/DESIGN.md §9.2). float64 stays float64.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class TrainingBatch:
    """What an objective sees of one training batch.

    ``H @ E.T`` would be the model's ``[r, n_items]`` training logits without the prior
    (one row per training target: a sequence's next item, or one of BERT4Rec's masked
    positions); ``E``'s row ``i`` is item ``i`` (row 0 is padding and never a candidate).
    """

    H: torch.Tensor  # [r, d] contexts of the training rows
    E: torch.Tensor  # [n_items, d] output item table
    targets: torch.Tensor  # [r] target item ids (never 0)
    window_ids: torch.Tensor | None = None  # [r] window of each row's target (prior_mode windowed)
    users: torch.Tensor | None = None  # [r] user id of each row (objectives with needs_users only)
    #: [r] 1 for a row that counts, 0 for one that does not (BERT4Rec's empty mask slots); None = all.
    #: Rows are weighted, not indexed away: a step then has no data-dependent shape (DESIGN §9.1)
    weights: torch.Tensor | None = None


def row_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values [r]`` over the rows that count (all of them when ``weights`` is None).

    Rows with weight 0 must hold finite values (give them a real target): their term is
    multiplied by 0, as RecBole's BERT4Rec does, and ``0 * inf`` would be NaN.
    """
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum()


class TrainingObjective(nn.Module):
    """A loss over :class:`TrainingBatch` rows; the model supplies the prior.

    ``model.prior_at_targets(targets, window_ids)`` and ``model.prior_at_items(items,
    window_ids)`` give ``tau * log p_hat`` (DESIGN §1, each row's own window in windowed
    mode). An objective is a module so that its buffers follow ``model.to(device)``; buffers
    recomputed from the data are not persistent, learned state that serving needs is (Adap-tau's
    global temperature), so that it travels with the model's checkpoint.
    """

    #: whether :meth:`loss` needs ``batch.users``
    needs_users: bool = False
    #: whether the model serves :meth:`serving_factors` instead of its own full-sort scores
    changes_serving: bool = False

    def loss(self, model: nn.Module, batch: TrainingBatch) -> torch.Tensor:
        """The mean training loss of the batch's rows (a scalar)."""
        raise NotImplementedError

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Per-epoch state (called by the trainer before each training epoch); none by default."""

    def serving_factors(self, H: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors whose product the model serves and the energy metrics measure (DESIGN §3)."""
        return H, E
