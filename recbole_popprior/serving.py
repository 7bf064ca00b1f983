"""Serving a trained prior-separated model at another ``beta``, with no retraining (docs/DESIGN.md §1).

``scores = h . e + beta * log p_hat``: ``beta`` only enters at serving time, so one trained
model can be evaluated at many ``beta`` (the comparison reports ``beta = tau`` and ``beta = 0``,
the beta sweep a list, and every tuning trial picks its best ``beta`` on validation).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from recbole_popprior.errors import PopPriorError


@contextlib.contextmanager
def serving_beta(model: torch.nn.Module, beta: float | None) -> Iterator[torch.nn.Module]:
    """Temporarily serve ``model`` with ``scores = h . e + beta * log p_hat`` (``None`` = tau)."""
    if not hasattr(model, "prior_beta"):
        raise PopPriorError(f"{type(model).__name__} is not a prior-separated model: it has no serving beta")
    previous = model.prior_beta
    model.prior_beta = None if beta is None else float(beta)
    try:
        yield model
    finally:
        model.prior_beta = previous


def evaluate_at(trainer: Any, eval_data: Any, beta: float | None = None) -> dict[str, float]:
    """RecBole's evaluation of ``trainer.model`` on ``eval_data``, served at ``beta`` (no checkpoint load).

    ``beta`` is ignored for a model without a serving weight (RecBole's own class).
    """
    model = trainer.model
    context = serving_beta(model, beta) if hasattr(model, "prior_beta") else contextlib.nullcontext()
    with context, torch.no_grad():
        result = trainer.evaluate(eval_data, load_best_model=False, show_progress=False)
    return {k: float(v) for k, v in dict(result or {}).items()}


def sweep_beta(trainer: Any, eval_data: Any, betas: Sequence[float], *,
               stage: str | None = None) -> list[dict[str, float]]:
    """Evaluate one trained prior-separated model at every ``beta`` (docs/DESIGN.md §1).

    Returns one dict per beta: ``beta`` plus RecBole's metric results at that beta. ``stage``
    (``"valid"`` or ``"test"``, default the trainer's) decides whether test-stage metrics such
    as ``PopPermutation`` run; they measure the learned dot product, which ``beta`` does not
    change, so they run at most once, at the first beta.
    """
    if not hasattr(trainer.model, "prior_beta"):
        raise PopPriorError("the beta sweep needs a prior-separated model (not RecBole's own class)")
    old_stage = trainer.eval_stage
    trainer.eval_stage = stage or old_stage
    rows = []
    try:
        for k, beta in enumerate(betas):
            if k > 0:
                trainer.eval_stage = "valid"
            rows.append({"beta": float(beta), **evaluate_at(trainer, eval_data, float(beta))})
    finally:
        trainer.eval_stage = old_stage
    return rows


__all__ = ["serving_beta", "evaluate_at", "sweep_beta"]
