"""One mixin that makes any CE-capable RecBole sequential model prior-separated (DESIGN.md §1).

    train:  logits[c, i] = h_c . e_i + tau  * log p_hat(i)
    serve:  scores[c, i] = h_c . e_i + beta * log p_hat(i)

RecBole models have no shared logits method: each builds its logits inline and calls
``self.loss_fct``. The mixin therefore replaces ``self.loss_fct`` after ``__init__`` with
:class:`PriorLoss`, which adds the prior whenever the class dimension is the item table
(auxiliary losses of other widths pass through untouched). Serving adds
``beta * log p_hat`` in ``full_sort_predict`` and ``predict``. Models that need more
(BERT4Rec, CORE, NLL models, ...) are handled in :mod:`recbole_popprior.model.special_cases`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from recbole_popprior.prior import WindowedPrior, estimate_log_prior, estimate_windowed_log_prior


def prior_term(log_prior: torch.Tensor, weight: torch.Tensor | float, width: int | None = None) -> torch.Tensor:
    """``weight * log_prior`` with padding (and any extra columns up to ``width``) at ``-inf``.

    ``log_prior`` is ``[..., n_items]`` with ``-inf`` at padding; multiplying ``-inf`` by a
    zero or negative weight would give NaN or ``+inf``, so the finite part is scaled and the
    masked entries are set afterwards. Extra columns (e.g. a mask token in an n_items+1
    table) are masked as well.
    """
    finite = torch.isfinite(log_prior)
    term = torch.where(finite, log_prior, torch.zeros_like(log_prior)) * weight
    term = term.masked_fill(~finite, -torch.inf)
    if width is not None and width > term.shape[-1]:
        pad = term.new_full((*term.shape[:-1], width - term.shape[-1]), -torch.inf)
        term = torch.cat([term, pad], dim=-1)
    return term


class PriorLoss(nn.Module):
    """Wraps a model's loss: adds ``tau * log p_hat`` to logits whose last dim is the item table.

    ``log_space=True`` is for NLL-style losses that receive log-probabilities: the prior is
    added in log space and the result renormalised with ``log_softmax`` (DESIGN §1 applied
    to a probability model).
    """

    def __init__(self, inner: Any, owner: nn.Module, log_space: bool = False):
        super().__init__()
        self.inner = inner
        self.log_space = log_space
        # a weak reference: registering the owner as a submodule would create a cycle
        self._owner = weakref.ref(owner)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner = self._owner()
        if owner is not None:
            input = owner.add_training_prior(input, log_space=self.log_space)
        return self.inner(input, target, *args, **kwargs)


class PriorSeparatedMixin:
    """Prior separation for a RecBole sequential model; put it first in the bases.

    Config keys (defaults in ``properties/overall.yaml``): ``prior_tau`` (float or
    ``learned``), ``prior_beta`` (None = tau), ``prior_alpha``, ``prior_mode``,
    ``prior_windows``, ``prior_window_by``, ``prior_serve_window``.
    """

    #: the loss attribute(s) the mixin wraps, and whether they take log-probabilities
    prior_loss_attrs: dict[str, bool] = {"loss_fct": False}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._init_prior(config, dataset)
        for attr, log_space in self.prior_loss_attrs.items():
            inner = getattr(self, attr, None)
            if inner is not None and not isinstance(inner, PriorLoss):
                setattr(self, attr, PriorLoss(inner, self, log_space=log_space))

    # --- the prior ------------------------------------------------------------------
    def _init_prior(self, config, dataset) -> None:
        tau = config["prior_tau"]
        self.prior_tau_learned = tau == "learned"
        if self.prior_tau_learned:
            self.prior_tau_param = nn.Parameter(torch.tensor(1.0))
        else:
            self.prior_tau_param = None
            self._tau = float(tau)
        beta = config["prior_beta"]
        self.prior_beta: float | None = None if beta is None else float(beta)
        self.prior_alpha = float(config["prior_alpha"])

        item_field = config["ITEM_ID_FIELD"]
        n_items = dataset.num(item_field)
        targets = dataset.inter_feat[item_field]
        self.register_buffer("log_prior", estimate_log_prior(targets, n_items, self.prior_alpha))
        self.prior_windowed = config["prior_mode"] == "windowed"
        self.prior_serve_window = int(config["prior_serve_window"])
        self._train_window_ids: torch.Tensor | None = None
        if self.prior_windowed:
            time_field = config["TIME_FIELD"]
            if time_field is None or time_field not in dataset.inter_feat:
                from recbole_popprior.errors import PopPriorError

                raise PopPriorError("prior_mode=windowed needs a time field: load TIME_FIELD "
                                    f"({time_field!r}) in load_col")
            windowed = estimate_windowed_log_prior(
                targets, dataset.inter_feat[time_field], n_items, int(config["prior_windows"]),
                by=config["prior_window_by"], alpha=self.prior_alpha)
            self.register_buffer("log_prior_windows", windowed.log_prior)
            self.register_buffer("prior_window_edges", windowed.edges)
            self._time_field = time_field
        else:
            self.log_prior_windows = None

    @property
    def tau(self) -> torch.Tensor | float:
        """The training weight of ``log p_hat`` (a parameter when ``prior_tau: learned``)."""
        return self.prior_tau_param if self.prior_tau_learned else self._tau

    @property
    def beta(self) -> float:
        """The serving weight of ``log p_hat``; defaults to the (current) training weight."""
        if self.prior_beta is not None:
            return self.prior_beta
        return float(self.prior_tau_param.detach()) if self.prior_tau_learned else self._tau

    def serving_log_prior(self) -> torch.Tensor:
        """``log p_hat`` used at serving time: the static prior, or the configured window's."""
        if self.prior_windowed:
            return self.log_prior_windows[self.prior_serve_window]
        return self.log_prior

    def training_log_prior(self, rows: int) -> torch.Tensor:
        """``[n_items]`` static prior, or ``[rows, n_items]`` per-example window priors."""
        if not self.prior_windowed or self._train_window_ids is None:
            return self.log_prior
        ids = self._train_window_ids
        if rows != ids.numel():
            if rows % ids.numel():
                raise RuntimeError(f"cannot align {rows} logit rows with {ids.numel()} training examples")
            ids = ids.repeat_interleave(rows // ids.numel())
        return self.log_prior_windows[ids]

    def add_training_prior(self, logits: torch.Tensor, log_space: bool = False) -> torch.Tensor:
        """``logits + tau * log p_hat`` when ``logits`` spans the item table (DESIGN §1, train)."""
        n_items = self.log_prior.shape[0]
        width = logits.shape[-1]
        if width not in (n_items, n_items + 1) or logits.dim() < 2:
            return logits
        if not self.prior_tau_learned and self._tau == 0.0:
            return logits
        rows = logits.reshape(-1, width).shape[0]
        term = prior_term(self.training_log_prior(rows), self.tau, width)
        out = logits.reshape(-1, width) + term
        if log_space:
            out = torch.log_softmax(out, dim=-1)
        return out.reshape(logits.shape)

    def add_serving_prior(self, scores: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``scores + beta * log p_hat`` (DESIGN §1, serve); ``items`` for pointwise scores."""
        beta = self.beta
        if beta == 0.0:
            return scores
        log_prior = self.serving_log_prior()
        if items is not None:
            return scores + prior_term(log_prior, beta)[items]
        return scores + prior_term(log_prior, beta, scores.shape[-1])[: scores.shape[-1]]

    # --- RecBole's model API ------------------------------------------------------------
    def calculate_loss(self, interaction):
        if self.prior_windowed:
            self._train_window_ids = WindowedPrior(self.log_prior_windows, self.prior_window_edges) \
                .window_of(interaction[self._time_field].to(self.prior_window_edges.device))
        try:
            return super().calculate_loss(interaction)
        finally:
            self._train_window_ids = None

    def full_sort_predict(self, interaction):
        return self.add_serving_prior(super().full_sort_predict(interaction))

    def predict(self, interaction):
        return self.add_serving_prior(super().predict(interaction), interaction[self.ITEM_ID])

    # --- what the energy metrics measure (DESIGN §3: the learned dot product only) ----------
    def popprior_learned_scores(self, interaction) -> torch.Tensor:
        """Full-sort scores without the prior term: ``h_c . e_i`` (or the model's own score)."""
        return super().full_sort_predict(interaction)

    def popprior_factors(self, interaction):
        """``(H [b, d], E [n_items, d])`` with ``H E^T`` = the learned scores, or ``None``."""
        from recbole_popprior.model.special_cases import factors

        return factors(self, interaction)
