"""``(H, E)`` per model, with ``H @ E.T`` equal to the learned full-sort scores (docs/DESIGN.md §3),
and the same for training (docs/DESIGN.md §6).

The energy metrics need the contexts ``H`` and the item table ``E`` of the learned dot product.
Most RecBole sequential models compute ``H = forward(item_seq, item_seq_len)`` and score against
``item_embedding.weight``; the table below lists the models that differ (other ``forward``
arguments, another output table, an output bias) and marks with ``None`` those whose learned score
is not a plain dot product (they take the collector's streaming fallback). The table serves the
plugin's models and RecBole's own baselines alike. A training objective that changes what the
model serves (Adap-tau, DESIGN §7.2) transforms the pair, so ``factors`` always gives the served
learned score.

:func:`training_factors` gives the same pair for a TRAINING batch (the factorised training path of
sampled softmax): ``H`` of every training row, the table ``E`` as the loss uses it, the targets,
and the model's loss terms other than the item softmax (its regularisers), so that
``CE(H E^T + tau log p_hat, targets) + auxiliary`` is exactly the model's own training loss.
:data:`NO_FACTORISED_TRAINING` lists the models whose loss cannot be written that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from recbole_popprior.errors import PopPriorError

def _seq(m, i):
    return i[m.ITEM_SEQ]


def _len(m, i):
    return i[m.ITEM_SEQ_LEN]


def _user(m, i):
    return i[m.USER_ID]


def _gather_last(m, i, output):
    return m.gather_indexes(output, _len(m, i) - 1)


def _bert4rec_factors(m, i):
    item_seq = m.reconstruct_test_data(_seq(m, i), _len(m, i))
    H = _gather_last(m, i, m.forward(item_seq))
    H = torch.cat([H, H.new_ones(H.shape[0], 1)], dim=1)
    E = torch.cat([m.item_embedding.weight[: m.n_items], m.output_bias.unsqueeze(1)], dim=1)
    return H, E


def _core_factors(m, i):
    return m.forward(_seq(m, i)) / m.temperature, F.normalize(m.item_embedding.weight, dim=-1)


def _s3rec_factors(m, i):
    H = _gather_last(m, i, m.forward(_seq(m, i), bidirectional=False))
    return H, m.item_embedding.weight[: m.n_items - 1]


def _ksr_table(m):
    return m.dense_layer_i(torch.cat((m.item_embedding.weight, m.entity_embedding.weight), -1))


def _fpmc_factors(m, i):
    # FPMC's score is MF + FMC: <UI(u), IU(i)> + <LI(last item), IL(i)>, one dot product of
    # the concatenations [UI(u), LI(last)] and [IU(i), IL(i)]
    last = _seq(m, i).gather(1, (_len(m, i) - 1).unsqueeze(1)).squeeze(1)
    H = torch.cat([m.UI_emb(_user(m, i)), m.LI_emb(last)], dim=1)
    return H, torch.cat([m.IU_emb.weight, m.IL_emb.weight], dim=1)


_Factors = Callable[[Any, Any], "tuple[torch.Tensor, torch.Tensor] | None"]

#: per-model ``(H, E)``; models not listed use ``forward(item_seq, item_seq_len)`` and
#: ``item_embedding.weight``; ``None`` marks models whose score is not a plain dot product.
_FACTORS: dict[str, _Factors | None] = {
    "Caser": lambda m, i: (m.forward(_user(m, i), _seq(m, i)), m.item_embedding.weight),
    "NextItNet": lambda m, i: (m.forward(_seq(m, i)), m.item_embedding.weight),
    "SHAN": lambda m, i: (m.forward(_seq(m, i), _user(m, i)), m.item_embedding.weight),
    "HGN": lambda m, i: (m.forward(_seq(m, i), _user(m, i)), m.item_embedding_for_prediction.weight),
    "NPE": lambda m, i: (m.forward(_seq(m, i), _user(m, i)), torch.relu(m.item_embedding.weight)),
    "HRM": lambda m, i: (m.forward(_seq(m, i), _user(m, i), _len(m, i)), m.item_embedding.weight),
    "FOSSIL": lambda m, i: (m.forward(_seq(m, i), _len(m, i), _user(m, i)), m.item_embedding.weight),
    "KSR": lambda m, i: (m.forward(_seq(m, i), _len(m, i)), _ksr_table(m)),
    "BERT4Rec": _bert4rec_factors,
    "S3Rec": _s3rec_factors,
    "CORE": _core_factors,
    "FPMC": _fpmc_factors,
    "GRU4RecCPR": None,
    "SASRecCPR": None,
    "RepeatNet": None,
    # RecBole's TransRec scores b_i - ||h - e_i|| (the distance, not its square: _l2_distance
    # takes the square root), which no finite H E^T reproduces: the streaming fallback measures it
    "TransRec": None,
}


def factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H [b, d], E [n_items, d])`` such that ``H @ E.T`` equals the model's learned
    full-sort scores (without the prior), or ``None`` when there is no such factorisation.

    A training objective that changes what the model serves (Adap-tau's cosines, DESIGN §7.2)
    transforms the pair: the factors are always those of the served, learned score.
    """
    pair = _model_factors(model, interaction)
    objective = getattr(model, "training_objective", None)
    if pair is not None and objective is not None and objective.changes_serving:
        pair = objective.serving_factors(*pair)
    return pair


def _model_factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's own ``(H, E)`` (the network's dot product, before any objective's transform)."""
    name = type(model).__name__
    if name in _FACTORS:
        build = _FACTORS[name]
        return None if build is None else build(model, interaction)
    if getattr(model, "item_embedding", None) is None or not hasattr(model, "ITEM_SEQ"):
        return None
    H = model.forward(_seq(model, interaction), _len(model, interaction))
    E = model.item_embedding.weight
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[-1] != E.shape[-1]:
        return None
    return H, E


# --- training (docs/DESIGN.md §6) ---------------------------------------------------------------
#: models whose training loss is not ``CE(H E^T) + regularisers``, with the reason
NO_FACTORISED_TRAINING: dict[str, str] = {
    "GRU4RecCPR": "its scores are a mixture of softmaxes, not a dot product h.e",
    "SASRecCPR": "its scores are a mixture of softmaxes, not a dot product h.e",
    "RepeatNet": "its scores mix a repeat and an explore distribution, not a dot product h.e",
    "FEARec": "its loss adds contrastive terms on the sequence outputs, which the factorised "
              "training path would drop",
    "FPMC": "it trains a pairwise BPR loss only (RecBole's FPMC has no softmax over the items)",
    "TransRec": "it trains a pairwise BPR loss only, and its score is a distance, not a dot product h.e",
}


@dataclass
class TrainingFactors:
    """One training batch in factorised form (see the module docstring).

    ``kept`` marks, among the rows the model's own loss would build (BERT4Rec: every masked
    slot), those that count; ``H`` and ``targets`` hold the kept rows only. ``None`` = all.
    """

    H: torch.Tensor  # [r, d]
    E: torch.Tensor  # [n_items, d]
    targets: torch.Tensor  # [r]
    kept: torch.Tensor | None = None  # [rows of the model's own loss] bool
    auxiliary: torch.Tensor | float = 0.0  # the model's own loss terms besides the item softmax


def _bert4rec_training(m, i) -> TrainingFactors:
    # RecBole's BERT4Rec scores the masked slots against E[:n_items] plus an output bias and
    # averages CE over the slots with masked_index > 0 (padding slots carry index 0)
    masked_index = i[m.MASK_INDEX]
    output = m.forward(i[m.MASK_ITEM_SEQ])  # [B L d]
    H = output.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, output.shape[-1])).reshape(-1, output.shape[-1])
    kept = (masked_index > 0).reshape(-1)
    H = torch.cat([H[kept], H.new_ones(int(kept.sum()), 1)], dim=1)
    E = torch.cat([m.item_embedding.weight[: m.n_items], m.output_bias.unsqueeze(1)], dim=1)
    return TrainingFactors(H, E, i[m.POS_ITEMS].reshape(-1)[kept], kept)


def _core_training(m, i) -> TrainingFactors:
    # CORE drops out item-table entries before normalising, in training only (after forward,
    # so the dropout masks are drawn in RecBole's order)
    H = m.forward(_seq(m, i)) / m.temperature
    E = F.normalize(m.item_dropout(m.item_embedding.weight), dim=-1)
    return TrainingFactors(H, E, i[m.POS_ITEM_ID])


def _shan_training(m, i) -> TrainingFactors:
    # RecBole's SHAN trains on the inverted sequence but scores the plain one in full_sort_predict
    H = m.forward(i[m.INVERSE_ITEM_SEQ], _user(m, i))
    return TrainingFactors(H, m.item_embedding.weight, i[m.POS_ITEM_ID])


_Training = Callable[[Any, Any], TrainingFactors]

#: models whose training rows, inputs or table differ from their full-sort factors
_TRAINING: dict[str, _Training] = {"BERT4Rec": _bert4rec_training, "CORE": _core_training, "SHAN": _shan_training}

_Auxiliary = Callable[[Any, Any, torch.Tensor], "torch.Tensor | float"]

#: the loss terms besides the item softmax, exactly as each model's calculate_loss adds them (CE)
_AUXILIARY: dict[str, _Auxiliary] = {
    "Caser": lambda m, i, H: m.reg_weight * m.reg_loss(
        [m.user_embedding.weight, m.item_embedding.weight, m.conv_v.weight, m.fc1.weight, m.fc2.weight])
    + m.reg_loss_conv_h(),
    "NextItNet": lambda m, i, H: m.reg_weight * m.reg_loss([m.item_embedding.weight, m.final_layer.weight])
    + m.reg_loss_rb(),
    "GCSAN": lambda m, i, H: m.reg_weight * m.reg_loss(m.item_embedding.weight),
    "SHAN": lambda m, i, H: m.reg_loss(m.user_embedding(_user(m, i)), m.item_embedding(i[m.POS_ITEM_ID])),
    "FOSSIL": lambda m, i, H: m.reg_loss(m.user_lambda(_user(m, i)), m.item_embedding(i[m.POS_ITEM_ID]), H),
    "HGN": lambda m, i, H: m.reg_loss(m.user_embedding(_user(m, i)), m.item_embedding_for_prediction(
        i[m.POS_ITEM_ID]), m.item_embedding(_seq(m, i))),
    "SINE": lambda m, i, H: m.calculate_reg_loss() * m.reg_loss_ratio if m.loss_type == "NLL" else 0.0,
}


def factorised_training_refusal(model: Any) -> str | None:
    """Why ``model`` cannot take the factorised training path, or ``None`` when it can."""
    name = type(model).__name__
    if name in NO_FACTORISED_TRAINING:
        return NO_FACTORISED_TRAINING[name]
    if name in _FACTORS and _FACTORS[name] is None:
        return "its score is not a dot product h.e"
    return None


def training_factors(model: Any, interaction) -> TrainingFactors:
    """``(H, E, targets)`` of a training batch, plus the model's auxiliary loss terms (DESIGN §6).

    Call it in training mode: ``H`` is computed by the model's ``forward`` exactly as its own
    ``calculate_loss`` computes it (same dropout draws, in the same order).
    """
    name = type(model).__name__
    if name in _TRAINING:
        parts = _TRAINING[name](model, interaction)
    else:
        pair = _model_factors(model, interaction)
        if pair is None:
            raise PopPriorError(f"{name} has no (H, E) factorisation of its training logits")
        parts = TrainingFactors(pair[0], pair[1], interaction[model.POS_ITEM_ID])
    if name in _AUXILIARY:
        parts.auxiliary = _AUXILIARY[name](model, interaction, parts.H)
    return parts
