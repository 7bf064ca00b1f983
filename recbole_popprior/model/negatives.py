"""``softmax_negatives: auto``: the full softmax while it fits, sampled softmax beyond (docs/DESIGN.md §6.1).

The full softmax builds ``[train_batch_size, n_items]`` float32 logits per training batch (and
as much again for their gradient): 5.7 GB at the Tianchi log's 731k items and RecBole's batch of
2048. ``auto`` keeps the exact full softmax while those logits fit ``eval_score_budget_mb`` (the
budget that already bounds evaluation's score chunks) and otherwise trains sampled softmax with
:data:`AUTO_NEGATIVES` negatives, with one log line either way. The choice depends on the config and
the item count only, so every arm of a ``--compare`` run resolves it identically.
"""

from __future__ import annotations

from logging import getLogger
from typing import Any

#: K of ``softmax_negatives: auto`` when the full softmax does not fit
AUTO_NEGATIVES = 8192
AUTO = "auto"

#: remedies with their own training loss (sampled softmax does not apply to them)
_OWN_LOSS_REMEDIES = ("directspec", "adap_tau")


def logits_mb(config: Any, n_items: int) -> float:
    """MB of one training batch's ``[train_batch_size, n_items]`` float32 logits."""
    return int(config["train_batch_size"]) * n_items * 4 / 2**20


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config[key] if key in config else default


def sampled_softmax_refusal(config: Any) -> str | None:
    """Why this configuration trains no sampled softmax whatever its size (``None``: it can)."""
    if _get(config, "loss_type") == "BPR" or _get(config, "popprior_baseline"):
        return "the loss is not the plugin's softmax" if _get(config, "popprior_baseline") else "the loss is BPR"
    remedy = _get(config, "remedy")
    if remedy in _OWN_LOSS_REMEDIES:
        return f"remedy {remedy} has its own training loss"
    if remedy == "resn" and _get(config, "resn_link") != "identity":
        return "ReSN's link builds the [batch, n_items] scores anyway"
    return None


def resolve_negatives(config: Any, n_items: int, model_refusal: str | None = None) -> int:
    """``softmax_negatives`` as a number: itself, or for ``auto`` 0 (the full softmax) when the
    logits fit ``eval_score_budget_mb`` or sampled softmax cannot apply, else :data:`AUTO_NEGATIVES`.

    ``model_refusal``: why the model cannot take the factorised training path (``None``: it can).
    """
    value = _get(config, "softmax_negatives", 0)
    if value != AUTO:
        return int(value)
    mb, budget = logits_mb(config, n_items), float(config["eval_score_budget_mb"])
    reason = model_refusal or sampled_softmax_refusal(config)
    if mb <= budget or reason is not None:
        why = f"{mb:,.0f} MB of logits per batch fit eval_score_budget_mb={budget:g}" if mb <= budget else reason
        getLogger().info(f"softmax_negatives: auto -> full softmax over {n_items:,} items ({why})")
        return 0
    getLogger().info(f"softmax_negatives: auto -> sampled softmax with K = {AUTO_NEGATIVES} negatives (the full "
                     f"softmax's logits would take {mb:,.0f} MB per batch, over eval_score_budget_mb={budget:g})")
    return AUTO_NEGATIVES


__all__ = ["AUTO", "AUTO_NEGATIVES", "resolve_negatives", "logits_mb", "sampled_softmax_refusal"]
