"""Every model that the generic mixin cannot handle alone, and why, in one place.

The generic path (:class:`~recbole_popprior.model.mixin.PriorSeparatedMixin`) wraps
``self.loss_fct``; that covers every model that builds ``[B, n_items]`` logits and calls it.
Entries here add what a model needs beyond that.
"""

from __future__ import annotations

from typing import Any

import torch

#: RecBole sequential models that cannot take a softmax prior, with the reason.
UNSUPPORTED: dict[str, str] = {
    "FPMC": "FPMC is trained with a BPR loss only, so there is no softmax to add a prior to",
    "TransRec": "TransRec is trained with a BPR loss only, so there is no softmax to add a prior to",
    "DIN": "DIN is a click-through-rate model (pointwise BCE on labels), not a softmax over items",
    "DIEN": "DIEN is a click-through-rate model (pointwise BCE on labels), not a softmax over items",
}

#: extra mixins per model name, placed between the generic mixin and RecBole's class.
SPECIAL_MIXINS: dict[str, type] = {}


def factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H, E)`` such that ``H @ E.T`` equals the model's learned full-sort scores, or ``None``.

    The common RecBole pattern is ``seq_output = forward(item_seq, item_seq_len)`` against
    ``item_embedding.weight``; models that differ override ``popprior_factors``.
    """
    item_embedding = getattr(model, "item_embedding", None)
    if item_embedding is None or not hasattr(model, "ITEM_SEQ"):
        return None
    H = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    E = item_embedding.weight
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[-1] != E.shape[-1]:
        return None
    return H, E
