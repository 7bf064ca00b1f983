"""One mixin that makes any CE-capable RecBole sequential model prior-separated (docs/DESIGN.md §1).

    train:  logits[c, i] = h_c . e_i + tau  * log p_hat(i)
    serve:  scores[c, i] = h_c . e_i + beta * log p_hat(i)

RecBole models have no shared logits method: each builds its logits inline and calls
``self.loss_fct``. The mixin therefore replaces ``self.loss_fct`` after ``__init__`` with
:class:`PriorLoss`, which adds the prior whenever the class dimension is the item table
(auxiliary losses of other widths pass through untouched). Serving adds
``beta * log p_hat`` in ``full_sort_predict`` and ``predict``. Models that need more
(BERT4Rec, S3Rec, probability models, ...) are plain subclasses in
:mod:`recbole_popprior.model.special_cases`, the one place where models differ; they override
the class attributes below.

With ``softmax_negatives > 0`` training takes the factorised path instead (docs/DESIGN.md §6):
``calculate_loss`` gets ``(H, E)`` of the training rows from
:func:`~recbole_popprior.model.factors.training_factors` and the configured
:class:`~recbole_popprior.model.objective.TrainingObjective` computes the loss, so no
``[B, n_items]`` logits are built. :func:`training_objective` chooses the objective.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.factors import factorised_training_refusal, factors, training_factors
from recbole_popprior.model.objective import TrainingBatch, TrainingObjective
from recbole_popprior.model.sampled_softmax import SampledSoftmax, sampler_distribution
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

    Why the width decides: RecBole models call the same ``self.loss_fct`` for their main
    softmax over items and for auxiliary losses (contrastive terms over a batch, for example);
    only the call whose classes are the item table may receive the prior.

    ``log_space=True`` is for NLL-style losses that receive log-probabilities: the prior is
    added in log space and the result renormalised with ``log_softmax`` (DESIGN §1 applied
    to a probability model: ``log p(i|c) + tau log p_hat(i) - log Z_c``).
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


def _check_softmax_loss(config) -> None:
    """The prior needs a softmax over items: refuse BPR (RecBole's CPR models would even
    ``sys.exit(0)`` on it) with one clear line."""
    loss_type = config["loss_type"] if "loss_type" in config else None
    if loss_type not in (None, "CE", "NLL"):
        raise PopPriorError(f"{config['model']} with loss_type={loss_type!r} has no softmax over items "
                            "to add the prior to; use loss_type: CE (or run the RecBole baseline "
                            "with popprior_baseline: True)")


def training_objective(config, model) -> TrainingObjective | None:
    """The objective of the factorised training path, from the config (``None`` = the model's
    own loss through :class:`PriorLoss`, the full softmax). The one place that chooses it."""
    negatives = int(config["softmax_negatives"])
    if negatives == 0:
        return None
    reason = factorised_training_refusal(model)
    if reason is not None:
        raise PopPriorError(f"{type(model).__name__} cannot train with softmax_negatives > 0: {reason}")
    q = sampler_distribution(config["softmax_sampler"], model.log_prior)
    return SampledSoftmax(q, negatives).to(model.log_prior.device)


class PriorSeparatedMixin:
    """Prior separation for a RecBole sequential model; put it first in the bases.

    Config keys (defaults in ``properties/overall.yaml``): ``prior_tau`` (float or
    ``learned``), ``prior_beta`` (None = tau), ``prior_alpha``, ``prior_mode``,
    ``prior_windows``, ``prior_window_by``, ``prior_serve_window``, and for the factorised
    training path ``softmax_negatives``, ``softmax_sampler``. The training weight is the
    model's ``prior_tau`` (a float, or a parameter when learned); a RecBole model's own
    ``self.tau`` (FEARec's and SINE's temperatures) is left alone.
    """

    #: loss attributes to wrap with :class:`PriorLoss` -> whether they receive log-probabilities
    prior_loss_attrs: dict[str, bool] = {"loss_fct": False}
    #: training logit columns beyond the item table (S3Rec's mask token)
    prior_extra_columns: int = 0
    #: serving scores are probabilities, not logits (CPR models, RepeatNet)
    prior_scores_are_probabilities: bool = False

    def __init__(self, config, dataset):
        _check_softmax_loss(config)
        super().__init__(config, dataset)
        self._init_prior(config, dataset)
        self._wrap_prior_losses()
        self._init_training_objective(config)

    def _init_training_objective(self, config) -> None:
        """Set ``self.training_objective`` (``None``: the model's own full-softmax loss)."""
        self.training_objective = training_objective(config, self) if self._trains_item_softmax() else None

    def _trains_item_softmax(self) -> bool:
        """Whether training is a softmax over the items (not S3Rec's pretraining)."""
        return True

    def _wrap_prior_losses(self) -> None:
        """Put :class:`PriorLoss` around every loss in ``prior_loss_attrs`` (idempotent)."""
        for attr, log_space in self.prior_loss_attrs.items():
            inner = getattr(self, attr, None)
            if inner is not None and not isinstance(inner, PriorLoss):
                setattr(self, attr, PriorLoss(inner, self, log_space=log_space))

    # --- the prior ------------------------------------------------------------------
    def _init_prior(self, config, dataset) -> None:
        tau = config["prior_tau"]
        self.prior_tau_learned = tau == "learned"
        #: the training weight of ``log p_hat``: a float, or a parameter initialised at 1
        self.prior_tau: nn.Parameter | float = nn.Parameter(torch.tensor(1.0)) if self.prior_tau_learned \
            else float(tau)
        beta = config["prior_beta"]
        self.prior_beta: float | None = None if beta is None else float(beta)
        self.prior_alpha = float(config["prior_alpha"])
        self._term_cache: dict[tuple, torch.Tensor] = {}

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

    def training_tau(self) -> float:
        """The (current) training weight of ``log p_hat`` as a number."""
        return float(self.prior_tau.detach()) if self.prior_tau_learned else self.prior_tau

    def effective_beta(self) -> float:
        """The serving weight of ``log p_hat``: ``prior_beta``, or the training weight."""
        return self.prior_beta if self.prior_beta is not None else self.training_tau()

    def serving_log_prior(self) -> torch.Tensor:
        """``log p_hat`` used at serving time: the static prior, or the configured window's."""
        if self.prior_windowed:
            return self.log_prior_windows[self.prior_serve_window]
        return self.log_prior

    def training_log_prior(self, rows: int) -> torch.Tensor:
        """``[n_items]`` static prior, or ``[rows, n_items]`` per-example window priors."""
        if not self.prior_windowed or self._train_window_ids is None:
            return self.log_prior
        return self.log_prior_windows[self._aligned_window_ids(rows)]

    def _aligned_window_ids(self, rows: int) -> torch.Tensor:
        ids = self._train_window_ids
        if rows != ids.numel():
            if rows % ids.numel():
                raise RuntimeError(f"cannot align {rows} logit rows with {ids.numel()} training examples")
            ids = ids.repeat_interleave(rows // ids.numel())
        return ids

    def _cached_term(self, source: torch.Tensor, weight: float, width: int, like: torch.Tensor) -> torch.Tensor:
        """``prior_term(source, weight, width)`` cast like ``like``, cached while nothing changes.

        The key holds the buffer's version counter, so ``load_state_dict`` (an in-place copy)
        or ``.to(device)`` invalidates it. Only used for a fixed (float) weight.
        """
        key = (id(source), source._version, weight, width, like.dtype, like.device)
        term = self._term_cache.get(key)
        if term is None:
            if len(self._term_cache) > 16:
                self._term_cache.clear()
            term = prior_term(source, weight, width).to(device=like.device, dtype=like.dtype)
            self._term_cache[key] = term
        return term

    def add_training_prior(self, logits: torch.Tensor, log_space: bool = False) -> torch.Tensor:
        """``logits + tau * log p_hat`` when ``logits`` spans the item table (DESIGN §1, train).

        With ``log_space`` the sum is renormalised with ``log_softmax`` (probability models).
        """
        width = logits.shape[-1]
        if logits.dim() < 2 or width != self.log_prior.shape[0] + self.prior_extra_columns:
            return logits
        tau = self.prior_tau
        if not self.prior_tau_learned and tau == 0.0:
            return logits
        if self.prior_windowed and self._train_window_ids is not None:
            rows = logits.numel() // width
            if self.prior_tau_learned:
                term = prior_term(self.log_prior_windows, tau, width)
            else:
                term = self._cached_term(self.log_prior_windows, tau, width, logits)
            term = term.index_select(0, self._aligned_window_ids(rows).to(term.device))
            out = (logits.reshape(rows, width) + term).reshape(logits.shape)
        elif self.prior_tau_learned:
            out = logits + prior_term(self.log_prior, tau, width)
        else:
            out = logits + self._cached_term(self.log_prior, tau, width, logits)
        if log_space:
            out = torch.log_softmax(out, dim=-1)
        return out

    def add_serving_prior(self, scores: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``scores + beta * log p_hat`` (DESIGN §1, serve); ``items`` for pointwise scores.

        Probability models (``prior_scores_are_probabilities``) get the same term in log
        space: full-sort scores become ``softmax(log p(i|c) + beta log p_hat(i))`` over the
        items, still probabilities and ranked by ``log p(i|c) + beta log p_hat(i)``;
        pointwise scores become ``p(i|c) * p_hat(i)^beta`` (the same ranking, unnormalised,
        since one item does not see the row's normaliser).
        """
        beta = self.effective_beta()
        if beta == 0.0:
            return scores
        log_prior = self.serving_log_prior()
        if items is not None:
            term = prior_term(log_prior, beta)[items]
            return scores * torch.exp(term) if self.prior_scores_are_probabilities else scores + term
        term = self._cached_term(log_prior, beta, scores.shape[-1], scores)[: scores.shape[-1]]
        if self.prior_scores_are_probabilities:
            return torch.softmax(torch.log(scores) + term, dim=-1)
        return scores + term

    def prior_at_targets(self, targets: torch.Tensor, window_ids: torch.Tensor | None) -> torch.Tensor:
        """``[r]``: ``tau * log p_hat(targets[r])``, each row's window prior when windowed (DESIGN §6)."""
        if window_ids is not None:
            return self.prior_tau * self.log_prior_windows[window_ids, targets]
        return self.prior_tau * self.log_prior[targets]

    def prior_at_items(self, items: torch.Tensor, window_ids: torch.Tensor | None) -> torch.Tensor:
        """``tau * log p_hat(items)``: ``[k]`` for the static prior, ``[r, k]`` (row r's window) when windowed."""
        if window_ids is not None:
            return self.prior_tau * self.log_prior_windows[:, items][window_ids]
        return self.prior_tau * self.log_prior[items]

    # --- RecBole's model API ------------------------------------------------------------
    def prior_window_ids(self, interaction) -> torch.Tensor:
        """Window of each training example: the window of its target's time (DESIGN §2)."""
        windows = WindowedPrior(self.log_prior_windows, self.prior_window_edges)
        return windows.window_of(interaction[self._time_field].to(self.prior_window_edges.device))

    def training_window_ids(self, interaction) -> torch.Tensor:
        """Window of each row of the model's own training loss (the examples, by default)."""
        return self.prior_window_ids(interaction)

    def factorised_loss(self, interaction) -> torch.Tensor:
        """The configured objective over ``training_factors`` plus the model's auxiliary terms (DESIGN §6)."""
        parts = training_factors(self, interaction)
        window_ids = None
        if self.prior_windowed:
            window_ids = self.training_window_ids(interaction).to(parts.targets.device)
            window_ids = window_ids if parts.kept is None else window_ids[parts.kept]
        batch = TrainingBatch(parts.H, parts.E, parts.targets, window_ids)
        return self.training_objective.loss(self, batch) + parts.auxiliary

    def calculate_loss(self, interaction):
        if self.training_objective is not None:
            return self.factorised_loss(interaction)
        if self.prior_windowed:
            self._train_window_ids = self.prior_window_ids(interaction)
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
        """Full-sort scores without the prior term: ``h_c . e_i`` (or the model's own score).

        For probability models this is ``log(p(i|c) + 1e-8)``: the log space in which the
        prior enters (the same epsilon the models use in their own losses).
        """
        scores = super().full_sort_predict(interaction)
        if self.prior_scores_are_probabilities:
            scores = torch.log(scores + 1e-8)
        return scores

    def popprior_factors(self, interaction):
        """``(H [b, d], E [n_items, d])`` with ``H E^T`` = the learned scores, or ``None``."""
        return factors(self, interaction)
