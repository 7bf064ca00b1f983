"""Sampled softmax with the logQ correction, consistent with prior separation (docs/DESIGN.md §6).

Per training batch one set ``N`` of negatives is drawn and shared by every row. Each real
item ``i`` enters ``N`` independently with probability ``pi_i = min(1, c q_i)`` (Poisson
sampling; ``c`` makes ``sum_i pi_i = K``, so ``|N|`` is ``K`` on average, without
duplicates; padding has ``q_0 = 0`` and is never drawn). Row ``r`` scores its own target
``y_r`` and the shared negatives with

    logits[r, j] = h_r . e_j + tau * log p_hat_t(r)(j) - log pi_j        j in {y_r} U N

where ``p_hat_t(r)`` is the row's window prior in windowed mode. A negative equal to the
row's target (an accidental hit) is masked out of that row. Given the candidate set, the
probability that candidate ``j`` is the true target is exactly ``softmax_j(log p(j|c) -
log pi_j)``, so ``h . e + tau log p_hat = log p(j|c) + a_c`` is the minimiser of the expected
loss for every ``K``: the dot product targets PMI as under the full softmax (DESIGN §1, §6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.fast_kernels import item_rows
from recbole_popprior.model.objective import TrainingBatch, TrainingObjective

SAMPLERS = ("uniform", "popularity")


def inclusion_probabilities(q: torch.Tensor, expected: float) -> torch.Tensor:
    """``pi_i = min(1, c q_i)`` with ``sum_i pi_i = min(expected, #{q_i > 0})`` (float64).

    ``c q_i`` alone would exceed 1 for items much more likely than ``1/K``; those are
    included with certainty and ``c`` is raised until the rest sum to the remaining count
    (water-filling over the items sorted by ``q``).
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
    """Sampled softmax over each row's target and ``K`` shared negatives (DESIGN §6)."""

    uses_few_item_rows = True

    def __init__(self, q: torch.Tensor, negatives: int):
        super().__init__()
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        self.negatives = int(negatives)
        pi = inclusion_probabilities(q, negatives)  # float64: O(n_items) memory, exact corrections
        self.register_buffer("inclusion", pi, persistent=False)
        log_pi = torch.where(pi > 0, torch.log(pi.clamp_min(1e-300)), torch.full_like(pi, -math.inf))
        self.register_buffer("log_inclusion", log_pi, persistent=False)

    def draw(self) -> torch.Tensor:
        """One batch's negatives: item ids in increasing order, each real item with probability ``pi_i``."""
        return torch.nonzero(torch.rand_like(self.inclusion) < self.inclusion).squeeze(1)

    def logits(self, model, batch: TrainingBatch, negatives: torch.Tensor) -> torch.Tensor:
        """``[r, 1 + |N|]``: column 0 each row's target, then the shared negatives (hits at -inf)."""
        H, E, targets = batch.H, batch.E, batch.targets
        log_pi = self.log_inclusion
        positive = ((H * item_rows(E, targets)).sum(-1) + model.prior_at_targets(targets, batch.window_ids)
                    - log_pi[targets].to(H.dtype))
        negative = (H @ item_rows(E, negatives).T + model.prior_at_items(negatives, batch.window_ids)
                    - log_pi[negatives].to(H.dtype))
        negative = negative.masked_fill(negatives[None, :] == targets[:, None], -math.inf)
        return torch.cat([positive[:, None], negative], dim=1)

    def loss(self, model, batch: TrainingBatch) -> torch.Tensor:
        logits = self.logits(model, batch, self.draw())
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


__all__ = ["SampledSoftmax", "inclusion_probabilities", "sampler_distribution", "SAMPLERS"]
