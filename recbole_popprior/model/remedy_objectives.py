"""The other remedies of docs/DESIGN.md §7 as training objectives of the factorised path (§6).

Each objective gets what :func:`~recbole_popprior.model.factors.training_factors` gives for a
training batch (the rows' contexts ``H``, the output table ``E``, the targets and, for Adap-tau,
the rows' users) and calls the pure functions of :mod:`recbole_popprior.remedies`; the model's own
regularisers are added by the mixin, as for sampled softmax.

- ``remedy: directspec``: :class:`DirectSpecObjective`, the released positive-pair objective over
  the filtered contexts and target rows (§7.1); serving is the unfiltered ``H E^T``.
- ``remedy: adap_tau``: :class:`AdapTauObjective`, cosine scores with a global and a per-user
  temperature, recomputed at every epoch start (§7.2); serving is ``h^ . e^ / t0``.
- ``remedy: resn``: :class:`ReSNObjective`, the model's softmax (full, or sampled) plus the
  spectral penalty on the learned logits ``H E^T`` (§7.4).

ACE (§7.3) only changes the initial item table: :meth:`PriorSeparatedMixin._init_ace`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from recbole_popprior import collective
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.objective import TrainingBatch, TrainingObjective, at_least_float32, row_mean
from recbole_popprior.remedies import (AdapTauStats, adap_tau_active_users, adap_tau_batch_stats,
                                       adap_tau_global_temperature, adap_tau_loss, adap_tau_t0,
                                       adap_tau_temperatures, directspec_loss, resn_penalty)

REMEDIES = ("directspec", "adap_tau", "resn")


def full_softmax_loss(model: Any, batch: TrainingBatch, logits: torch.Tensor) -> torch.Tensor:
    """CE of ``logits + tau log p_hat`` (each row's window when windowed) against the targets.

    The model's own loss, written from the factors (DESIGN §6): at ``tau = 0`` the prior is not
    added at all, so padding stays in the softmax as in RecBole's loss; otherwise its column is
    ``-inf``.
    """
    term = model.prior_logit_term(batch.window_ids)
    if term is not None:
        logits = at_least_float32(logits)  # an autocast matmul's bf16/fp16: the sum is float32 (DESIGN §9.2)
        logits = logits + term.to(device=logits.device, dtype=logits.dtype)
    if batch.weights is None:
        return F.cross_entropy(logits, batch.targets)
    return row_mean(F.cross_entropy(logits, batch.targets, reduction="none"), batch.weights)


class DirectSpecObjective(TrainingObjective):
    """``mean_c -log sigmoid(h''_c . e''_c)``, both sides filtered within the batch (DESIGN §7.1)."""

    def __init__(self, alpha: float, kappa: float, shrink_norm: float, plus: bool):
        super().__init__()
        self.alpha, self.kappa, self.shrink_norm, self.plus = float(alpha), float(kappa), float(shrink_norm), bool(plus)

    def loss(self, model, batch: TrainingBatch) -> torch.Tensor:
        return directspec_loss(batch.H, batch.E, batch.targets, self.alpha, self.kappa, self.shrink_norm, self.plus,
                               weights=batch.weights)


class ReSNObjective(TrainingObjective):
    """The model's softmax plus ``resn_weight * ||Y q||^2 / B`` with ``Y = link(H E[1:]^T)`` (DESIGN §7.4).

    The penalty is on the learned logits, never on the prior term. Over the full softmax the
    logits the loss builds are reused; over a sampled softmax (``base``) no ``[B, n]`` matrix
    exists, so only ``link: identity`` (computed from the factors in ``O(n d)``) is accepted.
    """

    def __init__(self, weight: float, link: str, n_power_iter: int, base: TrainingObjective | None = None):
        super().__init__()
        if base is not None and link != "identity":
            raise PopPriorError(f"remedy: resn with softmax_negatives > 0 needs resn_link: identity (link {link!r} "
                                "builds the [B, n_items] scores that sampled softmax avoids)")
        self.weight, self.link, self.n_power_iter, self.base = float(weight), link, int(n_power_iter), base

    def loss(self, model, batch: TrainingBatch) -> torch.Tensor:
        H, E = batch.H, batch.E
        if self.base is not None:
            return self.base.loss(model, batch) + self.weight * resn_penalty(H, E, "identity", self.n_power_iter,
                                                                             weights=batch.weights)
        logits = H @ E.T
        penalty = resn_penalty(H, E, self.link, self.n_power_iter, logits=logits, weights=batch.weights)
        return full_softmax_loss(model, batch, logits) + self.weight * penalty


class AdapTauObjective(TrainingObjective):
    """Adap-tau (DESIGN §7.2): ``-s_pos / t0 + log sum_{j != pos, 0} exp(s_j / t_u)``, ``s`` cosines.

    State: the global temperature ``t0`` (a persistent buffer: serving divides by it, so it
    travels with the checkpoint) and the per-user ``t_user``. During an epoch the objective sums
    :func:`adap_tau_batch_stats` over the training steps (active users only) and each user's
    plain loss, all on the device (a step never waits for it, DESIGN §9.1); :meth:`on_epoch_start`
    sums them over the DDP ranks (DESIGN §9.3) and turns them into the new temperatures: ``t0``
    from the summed cosines and the item table as the epoch's last step left it (the warm-up gap
    while ``epoch < warmup_epochs``), ``t_u`` by Lambert's W from the users' mean plain losses.
    """

    needs_users = True
    changes_serving = True

    def __init__(self, n_items: int, train_user_ids: torch.Tensor, n_users: int, rho: float, base: Any,
                 active_quantile: float, warmup_epochs: int, warmup_gap: float):
        super().__init__()
        self.n_items, self.n_users = int(n_items), int(n_users)
        self.rho, self.base = float(rho), base
        self.warmup_epochs, self.warmup_gap = int(warmup_epochs), float(warmup_gap)
        counts = torch.bincount(train_user_ids.long(), minlength=n_users)
        seen = torch.nonzero(counts > 0).squeeze(1)
        active = torch.zeros(n_users, dtype=torch.bool)
        if len(seen):
            active[seen] = adap_tau_active_users(counts[seen], active_quantile)
            if not active.any():  # every user has the same count (e.g. synthetic data): keep them all
                active[seen] = True
        self.register_buffer("active", active, persistent=False)
        t0 = adap_tau_t0(self.warmup_gap, 1, 1, self.n_items)
        self.register_buffer("t0", torch.tensor(t0, dtype=torch.float64))
        self.register_buffer("t_user", torch.full((n_users,), t0, dtype=torch.float64), persistent=False)
        # the epoch's sums (buffers, so they live on the model's device)
        self.register_buffer("epoch_loss_sum", torch.zeros(n_users, dtype=torch.float64), persistent=False)
        self.register_buffer("epoch_loss_count", torch.zeros(n_users, dtype=torch.float64), persistent=False)
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.epoch_stats: AdapTauStats | None = None
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()
        #: the item table of the epoch's last step, by reference (no copy per step): where the table
        #: is the embedding weight itself, it holds the values after that step's update
        self.epoch_last_E: torch.Tensor | None = None

    def on_epoch_start(self, model, epoch: int) -> None:
        self._sum_over_ranks()
        if epoch < self.warmup_epochs:
            self.t0.fill_(adap_tau_t0(self.warmup_gap, 1, 1, self.n_items))
        elif self.epoch_last_E is not None:
            E = self.epoch_last_E
            stats = self.epoch_stats if self.epoch_stats is not None else AdapTauStats.empty(E.shape[1], E.device)
            self.t0.fill_(adap_tau_global_temperature(stats, E, warmup_gap=self.warmup_gap))
        # else (no step since the last epoch start: a resumed run) the checkpoint's t0 stays
        user_loss = self.epoch_loss_sum / self.epoch_loss_count  # NaN for users without a row
        self.t_user.copy_(adap_tau_temperatures(user_loss, float(self.t0), self.rho, self.base).to(self.t_user))
        self._reset_epoch()

    def _sum_over_ranks(self) -> None:
        """Under DDP: every rank's epoch sums become their sum over the ranks (DESIGN §9.3), so
        that each rank computes the temperatures of the whole epoch, the same on every rank.
        A no-op in one process."""
        if not collective.is_distributed():
            return
        has = collective.all_reduce_tensor(torch.tensor([float(self.epoch_stats is not None)]))
        if float(has) not in (0.0, float(collective.world_size())):
            raise RuntimeError("Adap-tau: some DDP ranks ran training steps this epoch and others did not")
        parts = [self.epoch_loss_sum, self.epoch_loss_count]
        if self.epoch_stats is not None:
            parts.append(self.epoch_stats.packed())
        summed = collective.all_reduce_tensor(torch.cat(parts))
        n = self.n_users
        self.epoch_loss_sum.copy_(summed[:n])
        self.epoch_loss_count.copy_(summed[n:2 * n])
        if self.epoch_stats is not None:
            self.epoch_stats = AdapTauStats.unpacked(summed[2 * n:])

    def loss(self, model, batch: TrainingBatch) -> torch.Tensor:
        H, E, targets, users = batch.H, batch.E, batch.targets, batch.users
        t_ctx = self.t_user[users]
        rows, plain = adap_tau_loss(H, E, targets, self.t0, t_ctx)
        if model.training:
            self._collect(H, E, targets, users, plain, batch.weights)
        return row_mean(rows, batch.weights)

    @torch.no_grad()
    def _collect(self, H, E, targets, users, plain, weights: torch.Tensor | None = None) -> None:
        keep = self.active[users]
        if weights is not None:
            keep = keep & (weights > 0)
        step = adap_tau_batch_stats(H, E, targets, keep)
        self.epoch_stats = step if self.epoch_stats is None else self.epoch_stats + step
        plain = plain.detach().double()
        counts = torch.ones_like(plain) if weights is None else weights.to(plain.dtype)
        self.epoch_loss_sum.index_add_(0, users, plain * counts)
        self.epoch_loss_count.index_add_(0, users, counts)
        self.epoch_last_E = E.detach()

    def serving_factors(self, H: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h^ / t0, e^)``: cosines on the scale of the training logits (DESIGN §7.2)."""
        return F.normalize(H, dim=-1) / self.t0.to(H.dtype), F.normalize(E, dim=-1)


def remedy_objective(remedy: str, config: Any, model: Any, dataset: Any,
                     base: TrainingObjective | None) -> TrainingObjective:
    """The objective of ``remedy`` from the config keys of ``properties/overall.yaml`` (DESIGN §7)."""
    if remedy == "directspec":
        return DirectSpecObjective(config["directspec_alpha"], config["directspec_kappa"],
                                   config["directspec_shrink_norm"], config["directspec_plus"])
    if remedy == "resn":
        return ReSNObjective(config["resn_weight"], config["resn_link"], config["resn_power_iter"], base)
    if remedy == "adap_tau":
        users = dataset.inter_feat[config["USER_ID_FIELD"]]
        return AdapTauObjective(
            n_items=model.log_prior.shape[0] - 1, train_user_ids=torch.as_tensor(users), n_users=dataset.user_num,
            rho=config["adap_tau_rho"], base=config["adap_tau_base"],
            active_quantile=config["adap_tau_active_quantile"], warmup_epochs=config["adap_tau_warmup_epochs"],
            warmup_gap=config["adap_tau_warmup_gap"])
    raise PopPriorError(f"remedy must be one of {', '.join(REMEDIES)}, got {remedy!r}")


__all__ = ["REMEDIES", "DirectSpecObjective", "AdapTauObjective", "ReSNObjective", "full_softmax_loss",
           "remedy_objective"]
