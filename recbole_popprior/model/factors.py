"""``(H, E)`` per model, with ``H @ E.T`` equal to the learned full-sort scores (docs/DESIGN.md §3).

The energy metrics need the contexts ``H`` and the item table ``E`` of the learned dot product.
Most RecBole sequential models compute ``H = forward(item_seq, item_seq_len)`` and score against
``item_embedding.weight``; the table below lists the models that differ (other ``forward``
arguments, another output table, an output bias) and marks with ``None`` those whose learned score
is not a plain dot product (they take the collector's streaming fallback). The table serves the
plugin's models and RecBole's own baselines alike.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

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
    "GRU4RecCPR": None,
    "SASRecCPR": None,
    "RepeatNet": None,
}


def factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H [b, d], E [n_items, d])`` such that ``H @ E.T`` equals the model's learned
    full-sort scores (without the prior), or ``None`` when there is no such factorisation."""
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
