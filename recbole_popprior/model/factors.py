"""``(H, E)`` per model, with ``H @ E.T`` equal to the learned full-sort scores (docs/DESIGN.md §3),
and the same for training (docs/DESIGN.md §6).

The energy metrics need the contexts ``H`` and the item table ``E`` of the learned dot product.
How a model's pair is read is its record's ``factors`` (:mod:`.registry`; RecBole's models in
:mod:`.zoo`): most RecBole sequential models compute ``H = forward(item_seq, item_seq_len)`` and
score against ``item_embedding.weight`` (:func:`~.registry.generic_factors`); ``None`` marks the
models whose learned score is not a plain dot product (they take the collector's streaming
fallback). The records serve the plugin's models and RecBole's own baselines alike (they are
found by class). A training objective that changes what the model serves (Adap-tau, DESIGN §7.2)
transforms the pair, so :func:`factors` always gives the served learned score.

:func:`training_factors` gives the same pair for a TRAINING batch (the factorised training path of
sampled softmax): ``H`` of every training row, the table ``E`` as the loss uses it, the targets,
and the model's loss terms other than the item softmax (its regularisers), so that
``CE(H E^T + tau log p_hat, targets) + auxiliary`` is exactly the model's own training loss.
A record's ``no_factorised_training`` says why a model's loss cannot be written that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.registry import generic_factors, record_of


def factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H [b, d], E [n_items, d])`` such that ``H @ E.T`` equals the model's learned
    full-sort scores (without the prior), or ``None`` when there is no such factorisation.

    A training objective that changes what the model serves (Adap-tau's cosines, DESIGN §7.2)
    transforms the pair: the factors are always those of the served, learned score.
    """
    pair = model_factors(model, interaction)
    objective = getattr(model, "training_objective", None)
    if pair is not None and objective is not None and objective.changes_serving:
        pair = objective.serving_factors(*pair)
    return pair


def model_factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's own ``(H, E)`` (the network's dot product, before any objective's transform);
    an unregistered model is read the generic way (the collector verifies the pair)."""
    record = record_of(model)
    build = generic_factors if record is None else record.factors
    return None if build is None else build(model, interaction)


@dataclass
class TrainingFactors:
    """One training batch in factorised form (see the module docstring).

    ``weights`` marks, among the rows the model's own loss builds (BERT4Rec: every masked slot),
    those that count (1) and those that do not (0, with a real item as their target so that
    their term is finite); ``None`` = all count. Rows are weighted rather than indexed away, so
    that a training step has no data-dependent shape and never waits for the device (DESIGN §9.1).
    """

    H: torch.Tensor  # [r, d]
    E: torch.Tensor  # [n_items, d]
    targets: torch.Tensor  # [r]
    weights: torch.Tensor | None = None  # [r] float, 1 = counts, 0 = padding row
    auxiliary: torch.Tensor | float = 0.0  # the model's own loss terms besides the item softmax


def factorised_training_refusal(model: Any) -> str | None:
    """Why ``model`` (a class or an instance) cannot take the factorised training path, or ``None``."""
    record = record_of(model)
    if record is None:
        name = (model if isinstance(model, type) else type(model)).__name__
        return f"{name} is not a registered model"
    return record.factorised_training_refusal()


def training_factors(model: Any, interaction) -> TrainingFactors:
    """``(H, E, targets)`` of a training batch, plus the model's auxiliary loss terms (DESIGN §6).

    Call it in training mode: ``H`` is computed by the model's ``forward`` exactly as its own
    ``calculate_loss`` computes it (same dropout draws, in the same order).
    """
    record = record_of(model)
    if record is not None and record.training is not None:
        parts = record.training(model, interaction)
    else:
        pair = model_factors(model, interaction)
        if pair is None:
            raise PopPriorError(f"{type(model).__name__} has no (H, E) factorisation of its training logits")
        parts = TrainingFactors(pair[0], pair[1], interaction[model.POS_ITEM_ID])
    if record is not None and record.auxiliary is not None:
        parts.auxiliary = record.auxiliary(model, interaction, parts.H)
    return parts
