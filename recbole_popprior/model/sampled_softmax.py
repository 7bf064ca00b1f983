"""Sampled softmax with the logQ correction, consistent with prior separation (docs/DESIGN.md §6.1).

Per training batch ``K`` negatives are drawn, with replacement, and shared by every row. Each
draw is item ``i`` with probability ``pi_i / K``, where ``pi_i = min(1, c q_i)`` and ``c`` makes
``sum_i pi_i = K``: item ``i`` is expected ``pi_i`` times per batch, so the head of a popularity
sampler is drawn about once a batch instead of taking a large share of the draws (padding has
``q_0 = 0`` and is never drawn). Row ``r`` scores its own target ``y_r`` (column 0) and the ``K``
shared draws (columns ``1..K``) with

    logits[r, j] = h_r . e_j + tau * log p_hat_t(r)(j) - log pi_j

where ``p_hat_t(r)`` is the row's window prior in windowed mode, and its loss is

    loss_r = logsumexp_j logits[r, j] - logsumexp_{j : item_j = y_r} logits[r, j]

so a draw equal to the target (an accidental hit) counts as the target. Given the multiset of
the ``K + 1`` candidates, the probability that item ``j`` is the true target is exactly
``m_j p(j|c) / pi_j / Z`` (``m_j`` its multiplicity), which these logits reproduce when
``h . e + tau log p_hat = log p(j|c) + a_c``: that is the minimiser of the expected loss for
every ``K``, and the dot product targets PMI as under the full softmax (DESIGN §1, §6.1).

The draw has a fixed shape (``[K]``, by inverse CDF), so a training step has no host
synchronisation and no data-dependent shape (DESIGN §9). With ``K`` at least the number of
items with ``q_i > 0`` every such item is a candidate exactly once (hits masked out): the loss
is the full softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.objective import TrainingBatch, TrainingObjective, at_least_float32, row_mean

SAMPLERS = ("uniform", "popularity")


def inclusion_probabilities(q: torch.Tensor, expected: float) -> torch.Tensor:
    """``pi_i = min(1, c q_i)`` with ``sum_i pi_i = min(expected, #{q_i > 0})`` (float64).

    ``c q_i`` alone would exceed 1 for items much more likely than ``1/K``; those are
    capped at 1 and ``c`` is raised until the rest sum to the remaining count
    (water-filling over the items sorted by ``q``). Runs once, when the objective is built.
    """
    q = q.detach().to(torch.float64)
    if q.dim() != 1 or (q < 0).any() or not torch.isfinite(q).all() or q.sum() <= 0:
        raise ValueError("q must be a finite, non-negative vector with a positive sum")
    support = int((q > 0).sum())
    if expected >= support:
        return (q > 0).to(torch.float64)
    ordered = torch.sort(q, descending=True).values
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[j] = sum of ordered[j:]
    saturated = torch.arange(len(q), dtype=torch.float64)
    scale = (expected - saturated) / tail.clamp_min(torch.finfo(torch.float64).tiny)
    # the first j whose scale keeps the (j+1)-th largest q at or below 1 is the water level
    j = int(torch.nonzero(scale * ordered <= 1.0)[0, 0])
    return torch.clamp(scale[j] * q, max=1.0)


def sampler_distribution(sampler: str, log_prior: torch.Tensor) -> torch.Tensor:
    """``q`` over the item table: uniform over the real items, or ``p_hat`` (padding 0)."""
    if sampler == "uniform":
        q = torch.isfinite(log_prior).to(torch.float64)
        return q / q.sum()
    if sampler == "popularity":
        return torch.exp(log_prior.detach().to(torch.float64))
    raise PopPriorError(f"softmax_sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


class SampledSoftmax(TrainingObjective):
    """Sampled softmax over each row's target and ``K`` shared draws (DESIGN §6.1)."""

    def __init__(self, q: torch.Tensor, negatives: int):
        super().__init__()
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        self.negatives = int(negatives)
        pi = inclusion_probabilities(q, negatives)  # float64: O(n_items) memory, exact corrections
        self.register_buffer("inclusion", pi, persistent=False)
        log_pi = torch.where(pi > 0, torch.log(pi.clamp_min(1e-300)), torch.full_like(pi, -math.inf))
        self.register_buffer("log_inclusion", log_pi, persistent=False)
        #: every item with q > 0 is a candidate (K >= their number): the full softmax, no draw
        self.every_item = negatives >= int((pi > 0).sum())
        if self.every_item:
            self.register_buffer("support", torch.nonzero(pi > 0).squeeze(1), persistent=False)
        else:
            cdf = torch.cumsum(pi / pi.sum(), dim=0)
            self.register_buffer("cdf", cdf, persistent=False)

    def draw(self) -> torch.Tensor:
        """One batch's candidates beyond the targets: ``[K]`` item ids drawn with replacement,
        item ``i`` with probability ``pi_i / K`` each (or every item, once, when K covers them)."""
        if self.every_item:
            return self.support
        cdf = self.cdf
        u = torch.rand(self.negatives, device=cdf.device, dtype=cdf.dtype) * cdf[-1]
        # the first item whose cumulative probability exceeds u; cdf[0] = 0 keeps padding out,
        # and u < cdf[-1] keeps the index inside the table
        return torch.searchsorted(cdf, u, right=True)

    def logits(self, model, batch: TrainingBatch, negatives: torch.Tensor) -> torch.Tensor:
        """``[r, 1 + |N|]`` (float32 at least): column 0 each row's target, then the shared candidates.

        The dot products may come from an autocast matmul (bf16/fp16); the prior and the logQ
        terms are added in float32 (DESIGN §9.2). When every item is a candidate the target's
        own column among them is masked (``-inf``): the loss is the full softmax exactly.
        """
        H, E, targets = batch.H, batch.E, batch.targets
        log_pi = self.log_inclusion
        positive = at_least_float32((H * E[targets]).sum(-1))
        negative = at_least_float32(H @ E[negatives].T)
        dtype = positive.dtype
        positive = (positive + model.prior_at_targets(targets, batch.window_ids).to(dtype)
                    - log_pi[targets].to(dtype))
        negative = (negative + model.prior_at_items(negatives, batch.window_ids).to(dtype)
                    - log_pi[negatives].to(dtype))
        if self.every_item:
            negative = negative.masked_fill(negatives[None, :] == targets[:, None], -math.inf)
        return torch.cat([positive[:, None], negative], dim=1)

    def target_mask(self, batch: TrainingBatch, negatives: torch.Tensor) -> torch.Tensor:
        """``[r, 1 + |N|]`` bool: the columns that hold each row's target (column 0, and the
        accidental hits among the draws, which count as the target)."""
        hits = negatives[None, :] == batch.targets[:, None]
        if self.every_item:
            hits = torch.zeros_like(hits)
        return torch.cat([torch.ones_like(hits[:, :1]), hits], dim=1)

    def loss(self, model, batch: TrainingBatch) -> torch.Tensor:
        """``logsumexp(all columns) - logsumexp(the target's columns)``, per row, then the mean.

        A draw equal to the row's target scores exactly as column 0 (the same ``h . e_y + prior
        - log pi_y``), so the target's columns hold ``(1 + hits) exp(logit_0)`` and the row's loss
        is the cross-entropy of column 0 minus ``log(1 + hits)``: one fused softmax over
        ``[r, 1 + K]`` instead of two log-sum-exps, each a pass forward and one backward.
        """
        negatives = self.draw()
        logits = self.logits(model, batch, negatives)
        first = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        rows = F.cross_entropy(logits, first, reduction="none")
        if not self.every_item:
            hits = (negatives[None, :] == batch.targets[:, None]).sum(dim=1)
            rows = rows - torch.log1p(hits.to(rows.dtype))
        return row_mean(rows, batch.weights)


__all__ = ["SampledSoftmax", "inclusion_probabilities", "sampler_distribution", "SAMPLERS"]
