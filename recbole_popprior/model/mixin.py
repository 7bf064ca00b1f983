"""One mixin that makes any CE-capable RecBole sequential model prior-separated (docs/DESIGN.md §1).

    train:  logits[c, i] = h_c . e_i + tau  * log p_hat(i)
    serve:  scores[c, i] = h_c . e_i + beta * log p_hat(i)

RecBole models have no shared logits method: each builds its logits inline and calls ``self.loss_fct``.
The mixin therefore replaces ``self.loss_fct`` after ``__init__`` with :class:`PriorLoss`, which adds
the prior whenever the class dimension is the item table (auxiliary losses of other widths pass
through untouched). Serving adds ``beta * log p_hat`` in ``full_sort_predict`` and ``predict``. Models
that need more (BERT4Rec, S3Rec, probability models, ...) override the class attributes below in
plain subclasses in :mod:`recbole_popprior.model.special_cases`, the one place where models differ.

With ``loss_type: BPR`` (and for the BPR-only FPMC and TransRec) the model's BPR loss is wrapped
with :class:`~recbole_popprior.model.pairwise.PairwisePriorLoss` instead, which adds
``tau * log p_hat`` to the positive's and the negative's scores (docs/DESIGN.md §6.2).

With ``softmax_negatives > 0`` or a ``remedy`` training takes the factorised path instead
(docs/DESIGN.md §6, §7): ``calculate_loss`` gets ``(H, E)`` of the training rows from
:func:`~recbole_popprior.model.factors.training_factors` and the configured
:class:`~recbole_popprior.model.objective.TrainingObjective` computes the loss (chosen by
:func:`training_objective`). ``ace_init`` replaces the initial item table (docs/DESIGN.md §7.3).
"""

from __future__ import annotations

import weakref
from logging import getLogger
from typing import Any

import torch
from recbole.model.loss import BPRLoss
from recbole.utils import set_color
from torch import nn

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.factors import factorised_training_refusal, factors, training_factors
from recbole_popprior.model.fast_kernels import apply_fast_kernels
from recbole_popprior.model.negatives import logits_mb, resolve_negatives
from recbole_popprior.model.objective import TrainingBatch, TrainingObjective, at_least_float32
from recbole_popprior.model.pairwise import PairwisePriorLoss
from recbole_popprior.model.registry import require_record
from recbole_popprior.model.remedy_objectives import remedy_objective
from recbole_popprior.model.sampled_softmax import SampledSoftmax, sampler_distribution
from recbole_popprior.prior import WindowedPrior, estimate_log_prior, estimate_windowed_log_prior
from recbole_popprior.prior_source import true_log_prior
from recbole_popprior.remedies.ace import ace_init_table


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

    Why the width decides (an implicit dispatch, DESIGN §1.1): a model may call the same
    ``self.loss_fct`` for its softmax over items and for an auxiliary loss (an in-batch
    contrastive term, say); adding the prior to every call would break (or, at a width that
    matches by chance, corrupt) the auxiliary one, and the loss cannot tell the calls apart
    otherwise (tests/test_dispatch.py pins it). A ``[B, B]`` auxiliary call with ``B`` equal to
    the item count would be taken for the item softmax: no registered model makes one.

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


def check_loss_type(model_class: type, loss_type: str | None) -> None:
    """The prior needs a softmax over items (CE, NLL) or a pairwise loss (BPR); refuse anything
    else, and BPR where the model has none (RecBole's CPR models would even ``sys.exit(0)``).
    Reads the model's record (:mod:`.registry`); an unregistered or refused model is one line."""
    record = require_record(model_class)
    name = model_class.__name__
    if record.pairwise == "only":
        return
    if loss_type not in (None, "CE", "NLL", "BPR"):
        raise PopPriorError(f"{name} with loss_type={loss_type!r} has no softmax or pairwise loss to add the "
                            "prior to; use loss_type: CE or BPR")
    if loss_type == "BPR" and record.pairwise == "none":
        raise PopPriorError(f"{name} cannot train with loss_type BPR: {record.no_pairwise}; use loss_type: CE")


def training_objective(config, model, dataset=None) -> TrainingObjective | None:
    """The objective of the factorised training path, from the config (``None`` = the model's
    own loss through :class:`PriorLoss` or :class:`PairwisePriorLoss`). The one place that
    chooses it: ``softmax_negatives > 0`` gives sampled softmax (DESIGN §6.1), ``remedy`` one of
    the objectives of DESIGN §7 (ReSN on top of sampled softmax when both are set)."""
    reason = factorised_training_refusal(model)
    negatives = resolve_negatives(config, model.log_prior.shape[0], reason)  # ``auto``: full or K = 8192
    remedy = config["remedy"] if "remedy" in config else None
    if negatives == 0 and remedy is None:
        return None
    if reason is not None:
        what = f"remedy: {remedy}" if remedy is not None else "softmax_negatives > 0"
        raise PopPriorError(f"{type(model).__name__} cannot train with {what}: {reason}")
    objective = None
    if negatives > 0:
        objective = SampledSoftmax(sampler_distribution(config["softmax_sampler"], model.log_prior), negatives)
    if remedy is not None:
        objective = remedy_objective(remedy, config, model, dataset, objective)
    return objective.to(model.log_prior.device)


def _warn_full_softmax_size(config, n_items: int) -> None:
    """One log line when a full-softmax training batch's ``[train_batch_size, n_items]`` float32
    logits exceed ``eval_score_budget_mb``: on a large catalogue that is the step that runs out of
    memory, and ``softmax_negatives`` is the way out (DESIGN §6.1)."""
    mb = logits_mb(config, n_items)
    if mb > float(config["eval_score_budget_mb"]):
        getLogger().warning(set_color(
            f"full softmax over {n_items:,} items: the logits of one training batch take {mb:,.0f} MB "
            f"(and as much again for their gradient); for a large catalogue set softmax_negatives "
            f"(e.g. 8192, README: large catalogues)", "yellow"))


class PriorSeparatedMixin:
    """Prior separation for a RecBole sequential model; put it first in the bases.

    Config keys (defaults in ``properties/overall.yaml``): ``prior_tau`` (float or
    ``learned``), ``prior_beta`` (None = tau), ``prior_alpha``, ``prior_source``, ``prior_mode``,
    ``prior_windows``, ``prior_window_by``, ``prior_serve_window``; for the factorised
    training path ``softmax_negatives``, ``softmax_sampler`` and ``remedy`` with its
    ``directspec_*``, ``adap_tau_*`` and ``resn_*`` keys; ``ace_init`` and ``ace_lambda``.
    The training weight is the model's ``prior_tau`` (a float, or a parameter when learned); a
    RecBole model's own ``self.tau`` (FEARec's and SINE's temperatures) is left alone.
    """

    #: loss attributes to wrap with :class:`PriorLoss` -> whether they receive log-probabilities
    prior_loss_attrs: dict[str, bool] = {"loss_fct": False}
    #: training logit columns beyond the item table (S3Rec's mask token)
    prior_extra_columns: int = 0
    #: serving scores are probabilities, not logits (CPR models, RepeatNet)
    prior_scores_are_probabilities: bool = False

    def __init__(self, config, dataset):
        check_loss_type(type(self), config["loss_type"] if "loss_type" in config else None)
        super().__init__(config, dataset)
        self._init_prior(config, dataset)
        self._wrap_prior_losses()
        self._init_training_objective(config, dataset)
        self._init_ace(config, dataset)
        apply_fast_kernels(self, config)  # fast_* keys (DESIGN §11.2)

    def _init_training_objective(self, config, dataset) -> None:
        """Set ``self.training_objective`` (``None``: the model's own loss)."""
        self.training_objective = None
        if not self._trains_item_softmax():
            return
        self.training_objective = training_objective(config, self, dataset)
        if self.training_objective is None and not self.prior_pairwise:
            _warn_full_softmax_size(config, self.log_prior.shape[0])

    def _trains_item_softmax(self) -> bool:
        """Whether training scores the items (not S3Rec's pretraining)."""
        return True

    def _wrap_prior_losses(self) -> None:
        """Put :class:`PriorLoss` (a softmax) or :class:`PairwisePriorLoss` (RecBole's ``BPRLoss``)
        around every loss in ``prior_loss_attrs`` (idempotent)."""
        for attr, log_space in self.prior_loss_attrs.items():
            inner = getattr(self, attr, None)
            if inner is None or isinstance(inner, (PriorLoss, PairwisePriorLoss)):
                continue
            if isinstance(inner, BPRLoss):
                setattr(self, attr, PairwisePriorLoss(inner, self))
            else:
                setattr(self, attr, PriorLoss(inner, self, log_space=log_space))

    def _init_ace(self, config, dataset) -> None:
        """``ace_init``: the ACE-reshaped table replaces the real-item rows of the model's item
        table(s) after RecBole's own init (DESIGN §7.3); padding and extra rows keep RecBole's."""
        path = config["ace_init"] if "ace_init" in config else None
        if path is None:
            return
        attrs = require_record(type(self)).ace_tables
        if isinstance(attrs, str):
            raise PopPriorError(f"{type(self).__name__} cannot take ace_init: {attrs}")
        tables = [getattr(self, attr) for attr in attrs]
        n_items = self.log_prior.shape[0]
        tokens = dataset.field2id_token[config["ITEM_ID_FIELD"]]
        init = ace_init_table(path, tokens, float(config["ace_lambda"]), tables[0].weight.shape[1])
        with torch.no_grad():
            for table in tables:
                table.weight[1:n_items].copy_(init[1:].to(table.weight))

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before each training epoch: the objective's per-epoch state."""
        if self.training_objective is not None:
            self.training_objective.on_epoch_start(self, epoch)

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
        loss_type = config["loss_type"] if "loss_type" in config else None
        #: BPR training: the pairwise prior (DESIGN §6.2); the batch's item pairs while a loss runs
        self.prior_pairwise = loss_type == "BPR" or require_record(type(self)).pairwise == "only"
        self._train_pairs: tuple[torch.Tensor, torch.Tensor] | None = None

        item_field = config["ITEM_ID_FIELD"]
        n_items = dataset.num(item_field)
        targets = dataset.inter_feat[item_field]
        #: ``estimate`` (counted on the training targets) or ``true`` (the synthetic generator's p)
        self.prior_source = config["prior_source"] if "prior_source" in config else "estimate"
        log_prior = true_log_prior(config, dataset) if self.prior_source == "truth" else \
            estimate_log_prior(targets, n_items, self.prior_alpha)
        self.register_buffer("log_prior", log_prior)
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

    def _serving_weight(self) -> torch.Tensor | float:
        """``beta`` for scoring: :meth:`effective_beta`, except that a learned ``tau`` serving as
        ``beta`` stays a tensor, so that scoring never reads it back to the host (DESIGN §9.1)."""
        if self.prior_beta is None and self.prior_tau_learned:
            return self.prior_tau.detach()
        return self.effective_beta()

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
        logits = at_least_float32(logits)  # an autocast matmul's bf16/fp16: the sum is float32 (DESIGN §9.2)
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
        beta = self._serving_weight()
        if isinstance(beta, float) and beta == 0.0:
            return scores
        scores = at_least_float32(scores)
        if items is not None:
            term = prior_term(self.serving_log_prior(), beta)[items]
            return scores * torch.exp(term) if self.prior_scores_are_probabilities else scores + term
        term = self.serving_prior_term(scores.shape[-1], scores)
        if self.prior_scores_are_probabilities:
            return torch.softmax(torch.log(scores) + term, dim=-1)
        if not torch.is_grad_enabled() and scores._base is None and scores.dim() == 2:
            # evaluation: the learned scores are a fresh matrix, so the sum needs no second one
            return scores.add_(term)
        return scores + term

    def serving_prior_term(self, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """``beta * log p_hat`` over ``width`` full-sort columns (padding ``-inf``), cast like
        ``like`` (cached for a fixed ``beta``); ``None`` when ``beta = 0`` (nothing is added). The
        full-sort scorer (:mod:`recbole_popprior.evaluator.full_sort`) adds it in place into its
        score buffer."""
        beta = self._serving_weight()
        if isinstance(beta, float):
            if beta == 0.0:
                return None
            return self._cached_term(self.serving_log_prior(), beta, width, like)[:width]
        return prior_term(self.serving_log_prior(), beta, width).to(like.dtype)[:width]

    def add_pairwise_prior(self, pos_score: torch.Tensor, neg_score: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_pos + tau log p_hat(pos), s_neg + tau log p_hat(neg))`` for the batch's pairs (DESIGN §6.2).

        Scores that do not hold one entry per pair (no RecBole model makes such a call) pass
        through; at a fixed ``tau = 0`` nothing is added, so the loss is RecBole's bit for bit.
        """
        pairs = self._train_pairs
        if pairs is None or (not self.prior_tau_learned and self.prior_tau == 0.0):
            return pos_score, neg_score
        pos_items, neg_items = pairs
        if pos_score.numel() != pos_items.numel() or neg_score.numel() != neg_items.numel():
            return pos_score, neg_score
        window_ids = None
        if self.prior_windowed and self._train_window_ids is not None:
            window_ids = self._aligned_window_ids(pos_items.numel()).to(pos_items.device)
        pos_term = self.prior_at_targets(pos_items.reshape(-1), window_ids).reshape(pos_score.shape)
        neg_term = self.prior_at_targets(neg_items.reshape(-1), window_ids).reshape(neg_score.shape)
        pos_score, neg_score = at_least_float32(pos_score), at_least_float32(neg_score)  # DESIGN §9.2
        return pos_score + pos_term.to(pos_score.dtype), neg_score + neg_term.to(neg_score.dtype)

    def prior_logit_term(self, window_ids: torch.Tensor | None) -> torch.Tensor | None:
        """``tau * log p_hat`` over the item table (``[n_items]``, or ``[r, n_items]`` per row's
        window), padding ``-inf``; ``None`` at a fixed ``tau = 0`` (the model's own logits)."""
        if not self.prior_tau_learned and self.prior_tau == 0.0:
            return None
        source = self.log_prior if window_ids is None else self.log_prior_windows[window_ids]
        return prior_term(source, self.prior_tau)

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
        users = None
        if self.training_objective.needs_users:
            users = self._row_users(interaction, parts).to(parts.targets.device)
        batch = TrainingBatch(parts.H, parts.E, parts.targets, window_ids, users, parts.weights)
        return self.training_objective.loss(self, batch) + parts.auxiliary

    def _row_users(self, interaction, parts) -> torch.Tensor:
        """The user of every training row (BERT4Rec: each masked slot of the user's sequence)."""
        users = interaction[self.USER_ID]
        rows = parts.targets.numel()
        if rows != users.numel():
            users = users.repeat_interleave(rows // users.numel())
        return users

    def calculate_loss(self, interaction):
        """The factorised objective's loss, or the model's own loss with the prior (DESIGN §1, §6.2).

        The batch's window ids and BPR pairs are side-channel state, set only around
        ``super().calculate_loss`` (an implicit dispatch, DESIGN §1.1): RecBole's models call
        ``self.loss_fct(logits, targets)`` without the interaction, so the loss wrappers cannot
        be handed them, and rewriting 29 models' losses to pass them would copy RecBole. The
        ``finally`` matters: state left behind would be read by the next call to the loss
        (another batch's windows or pairs; tests/test_dispatch.py pins it).
        """
        if self.training_objective is not None:
            return self.factorised_loss(interaction)
        if self.prior_windowed:
            self._train_window_ids = self.prior_window_ids(interaction)
        if self.prior_pairwise:
            self._train_pairs = (interaction[self.POS_ITEM_ID], interaction[self.NEG_ITEM_ID])
        try:
            return super().calculate_loss(interaction)
        finally:
            self._train_window_ids = None
            self._train_pairs = None

    def _serves_objective_factors(self) -> bool:
        return self.training_objective is not None and self.training_objective.changes_serving

    def _learned_full_sort(self, interaction) -> torch.Tensor:
        """The learned full-sort scores: RecBole's, or ``H E^T`` of the objective's serving factors."""
        if self._serves_objective_factors():
            H, E = factors(self, interaction)
            return H @ E.T
        return super().full_sort_predict(interaction)

    def full_sort_predict(self, interaction):
        return self.add_serving_prior(self._learned_full_sort(interaction))

    def predict(self, interaction):
        items = interaction[self.ITEM_ID]
        if self._serves_objective_factors():
            H, E = factors(self, interaction)
            return self.add_serving_prior((H * E[items]).sum(dim=-1), items)
        return self.add_serving_prior(super().predict(interaction), items)

    # --- what the energy metrics measure (DESIGN §3: the learned dot product only) ----------
    def popprior_learned_scores(self, interaction) -> torch.Tensor:
        """Full-sort scores without the prior term: ``h_c . e_i`` (or the model's own score).

        For probability models this is ``log(p(i|c) + 1e-8)``: the log space in which the
        prior enters (the same epsilon the models use in their own losses).
        """
        scores = self._learned_full_sort(interaction)
        if self.prior_scores_are_probabilities:
            scores = torch.log(scores + 1e-8)
        return scores

    def popprior_factors(self, interaction):
        """``(H [b, d], E [n_items, d])`` with ``H E^T`` = the learned scores, or ``None``."""
        return factors(self, interaction)
