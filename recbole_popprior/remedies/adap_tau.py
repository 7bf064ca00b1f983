"""Adap-tau: normalised scores with a global and a per-user temperature (Chen et al., WWW 2023,
arXiv 2302.04775, code github.com/junkangwu/Adap_tau; DESIGN.md §7.2).

Scores are cosines ``s[c, i] = h^_c . e^_i``. Temperatures are written ``t`` here because ``tau``
is the prior weight in the rest of the plugin.

    t0   = (mean_pos s - mean_all s) / log(n_rows * n / (2 * n_pos))      global, every epoch
    t_u  = t0 * exp(W0(x_u)),  x_u = clip((l_u - base) / rho, -1/e, 1000)  per user, every epoch
    loss = -s[c, pos] / t0 + log sum_{j != pos, j != 0} exp(s[c, j] / t_u(c))

``l_u`` is user ``u``'s mean plain loss (the same loss at ``t = 1``) over the previous epoch,
``base`` its mean over users (or a quantile), ``W0`` the principal branch of Lambert's W. The
means in ``t0`` run over the training pairs of users with more interactions than the 20 %
quantile. Serving ranks by the cosine (a per-user temperature cannot change a user's ranking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import lambertw

#: the clip applied to the Lambert-W argument: W0 is real from -1/e, and capped as released
W_ARG_MIN, W_ARG_MAX = -math.exp(-1.0), 1000.0
#: the score gap assumed while warming up (the released code's ``b = -0.7``)
WARMUP_GAP = 0.7


@dataclass(frozen=True)
class AdapTauStats:
    """Sums over training pairs needed by :func:`adap_tau_global_temperature`; add batches with ``+``.

    All three are float64 tensors on the device of the batches (``n_pairs`` too: a count kept as
    a tensor, so that summing a step's pairs never waits for the device, DESIGN §9.1).
    """

    pos_cos_sum: torch.Tensor  # [] sum over pairs of cos(h_c, e_pos(c))
    ctx_dir_sum: torch.Tensor  # [d] sum over pairs of h_c / ||h_c||
    n_pairs: torch.Tensor  # [] number of pairs

    @classmethod
    def empty(cls, d: int, device: torch.device | str | None = None) -> "AdapTauStats":
        """No pairs yet: the start of an epoch's accumulation."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(zero, torch.zeros(d, dtype=torch.float64, device=device), zero.clone())

    def __add__(self, other: "AdapTauStats") -> "AdapTauStats":
        return AdapTauStats(self.pos_cos_sum + other.pos_cos_sum, self.ctx_dir_sum + other.ctx_dir_sum,
                            self.n_pairs + other.n_pairs)

    def packed(self) -> torch.Tensor:
        """``[2 + d]``: ``(pos_cos_sum, n_pairs, ctx_dir_sum)`` in one tensor (one all-reduce)."""
        return torch.cat([self.pos_cos_sum.reshape(1), self.n_pairs.reshape(1), self.ctx_dir_sum])

    @classmethod
    def unpacked(cls, packed: torch.Tensor) -> "AdapTauStats":
        return cls(packed[0], packed[2:], packed[1])


def adap_tau_batch_stats(H: torch.Tensor, E: torch.Tensor, pos_items: torch.Tensor,
                         keep: torch.Tensor | None = None) -> AdapTauStats:
    """This batch's contribution to ``t0``: ``keep`` (bool ``[B]``) marks the pairs of active users.

    The pairs left out get weight 0 instead of being indexed away: the result has the same
    shape whatever ``keep`` holds, and nothing waits for the device.
    """
    with torch.no_grad():
        h = F.normalize(H.double(), dim=-1)
        e = F.normalize(E[pos_items].double(), dim=-1)
        w = torch.ones(h.shape[0], dtype=torch.float64, device=h.device) if keep is None \
            else keep.to(device=h.device, dtype=torch.float64)
        return AdapTauStats(((h * e).sum(-1) * w).sum(), (h * w[:, None]).sum(dim=0), w.sum())


def adap_tau_active_users(counts: torch.Tensor, quantile: float = 0.2) -> torch.Tensor:
    """Users whose training-pair count exceeds the ``quantile`` of all counts (the released filter)."""
    counts = counts.double()
    return counts > torch.quantile(counts, quantile)


def adap_tau_t0(gap: float, n_rows: int, n_pos: int, n_items: int) -> float:
    """``t0 = gap / log(n_rows * n_items / (2 n_pos))``: the closed form of the released code (its
    quadratic with a vanishing second-order term), where ``gap = mean_pos s - mean_all s``."""
    return float(gap / math.log(n_rows * n_items / (2.0 * n_pos)))


def adap_tau_global_temperature(stats: AdapTauStats, E: torch.Tensor, warmup: bool = False,
                                warmup_gap: float = WARMUP_GAP) -> float:
    """``t0`` from the pair sums and the current item table ``E`` (row 0 padding, excluded).

    Each training pair is one row of the score matrix with one positive, so ``n_rows = n_pos``
    and the log term is ``log(n / 2)``. While ``warmup`` (and whenever the measured gap is not
    positive, where the formula has no meaning) the gap is ``warmup_gap``.
    """
    n_items = E.shape[0] - 1
    gap = warmup_gap
    n_pairs = float(stats.n_pairs)
    if not warmup and n_pairs > 0:
        with torch.no_grad():
            item_dir = F.normalize(E[1:].double(), dim=-1).mean(dim=0)
            all_mean = float(stats.ctx_dir_sum.double().to(item_dir.device) @ item_dir) / n_pairs
        measured = float(stats.pos_cos_sum) / n_pairs - all_mean
        if measured > 0:
            gap = measured
    return adap_tau_t0(gap, 1, 1, n_items)


def adap_tau_temperatures(user_loss: torch.Tensor, t0: float, rho: float = 1.0,
                          base: str | float = "mean") -> torch.Tensor:
    """Per-user temperatures ``t_u = t0 exp(W0(x_u))``, ``x_u = clip((l_u - base) / rho, -1/e, 1000)``.

    ``user_loss`` [n_users] holds each user's mean plain loss over the last epoch, NaN for users
    with no training pair (they get ``t0``). ``base`` is ``"mean"`` (the released ``weight_mean``)
    or a quantile in [0, 1] (``weight_ratio``). Lambert's W is evaluated by scipy, not tabulated.
    """
    loss = user_loss.detach().double().cpu().numpy()
    seen = np.isfinite(loss)
    out = np.full(loss.shape, float(t0))
    if seen.any():
        ref = loss[seen].mean() if base == "mean" else np.quantile(loss[seen], float(base))
        x = np.clip((loss[seen] - ref) / rho, W_ARG_MIN, W_ARG_MAX)
        # float(-1/e) lies a hair below the true branch point, where scipy returns NaN;
        # W0(-1/e) = -1 exactly, so the clipped floor is set by hand
        w = np.where(x <= W_ARG_MIN, -1.0, lambertw(np.maximum(x, W_ARG_MIN), 0).real)
        out[seen] = t0 * np.exp(w)
    return torch.from_numpy(out).to(user_loss.device)


def adap_tau_loss(H: torch.Tensor, E: torch.Tensor, pos_items: torch.Tensor, t0: float | torch.Tensor,
                  t_ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Adap-tau loss and the plain (``t = 1``) loss that feeds next epoch's ``l_u``.

    ``t_ctx`` [B] is the temperature of each row's user, ``t0`` the global one (a number or a
    tensor on the device, so that the step never reads it back). As released, the positive is
    scaled by the global ``t0`` and is not in the denominator; the denominator runs over every
    real item but the target (full softmax here, sampled negatives in the paper). Padding never
    scores. The cosines may come from an autocast matmul; the scaled logits are float32.
    """
    s = F.normalize(H, dim=-1) @ F.normalize(E, dim=-1).T
    s = s if s.dtype in (torch.float32, torch.float64) else s.float()
    rows = torch.arange(s.shape[0], device=s.device)
    s_pos = s[rows, pos_items]
    drop = torch.zeros_like(s, dtype=torch.bool)
    drop[:, 0] = True
    drop[rows, pos_items] = True
    neg = s.masked_fill(drop, -torch.inf)
    t_ctx = t_ctx.to(s.dtype)
    if isinstance(t0, torch.Tensor):
        t0 = t0.to(s.dtype)
    loss = -s_pos / t0 + torch.logsumexp(neg / t_ctx.unsqueeze(1), dim=1)
    with torch.no_grad():
        plain = -s_pos + torch.logsumexp(neg, dim=1)
    return loss, plain


def adap_tau_user_mean_loss(user_ids: torch.Tensor, plain_loss: torch.Tensor, n_users: int) -> torch.Tensor:
    """Each user's mean plain loss over an epoch's rows (``l_u``); NaN for users with no row."""
    total = torch.zeros(n_users, dtype=torch.float64, device=plain_loss.device)
    count = torch.zeros_like(total)
    total.index_add_(0, user_ids, plain_loss.detach().double())
    count.index_add_(0, user_ids, torch.ones_like(total[user_ids]))
    return total / count  # 0/0 = NaN for unseen users
