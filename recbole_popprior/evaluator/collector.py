"""The plugin's evaluation collector: feeds the energy metrics with the model's contexts.

The trainer mixin (:mod:`recbole_popprior.trainer`) calls, per full-sort batch (or per row
chunk of one, when the batch's scores exceed ``eval_score_budget_mb``),
``context_collect(model, interaction, scores, positive_u, positive_i)``; RecBole itself
calls ``data_collect(train_data)``, ``eval_batch_collect(...)``, ``model_collect(model)``
and ``get_data_struct()``. Work happens only for the data-struct keys that the configured
metrics declare in ``metric_need`` (``popprior.*``), so plain runs pay nothing.

What is measured is the LEARNED score only (docs/DESIGN.md §3), obtained from the model by:

1. ``model.popprior_factors(interaction) -> (H, E)`` (or ``None``): factorised path;
2. otherwise, for RecBole's own models, the same per-model table
   (:func:`recbole_popprior.model.factors.factors`), once ``H E^T`` has been verified
   against the model's learned scores on the first batch;
3. otherwise the streaming fallback over ``model.popprior_learned_scores(interaction)``
   (RecBole models: ``full_sort_predict``).

The prior is ``model.log_prior`` / ``model.log_prior_windows`` when the model has them, else
it is estimated from the training split in :meth:`PopPriorCollector.data_collect`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from recbole_popprior import collective
from recbole_popprior.compat import FixedCollector
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.diagnostics import embedding_diagnostics
from recbole_popprior.evaluator.energy import (ContextStats, ScoreStats, as_float64, energy_from_stats,
                                               item_table)
from recbole_popprior.evaluator.topk import exact_topk, topk_hits
from recbole_popprior.model.factors import factors
from recbole_popprior.prior import estimate_log_prior, estimate_windowed_log_prior

ENERGY_KEY = "popprior.energy"
PERMUTATION_KEY = "popprior.permutation"
SUBSPACE_KEY = "popprior.subspace"
EMBEDDING_KEY = "popprior.embedding"
TARGETS_KEY = "popprior.target_items"

#: entries of the first batch the factor check compares (rows x items), bounding its float64 temporaries
_FACTOR_CHECK_ENTRIES = 2 ** 22
#: how many standard deviations of the rounding error the check allows (a sum of many independent errors)
_FACTOR_SIGMAS = 6.0


def score_roundoff(dtype: torch.dtype, device_type: str, matmul_precision: str) -> tuple[float, float, float]:
    """``(u_in, u_acc, u_out)``: the unit roundoffs of a matmul that produced ``dtype`` scores.

    ``u_in``: the inputs' rounding (0 for float32 on CPU and at ``highest`` precision; TF32's
    ``2^-11`` on CUDA at ``torch.get_float32_matmul_precision() == "high"``, bf16's ``2^-8`` at
    ``medium``; a half type's own under autocast); ``u_acc``: float32 accumulation, ``2^-24``
    (float64: ``2^-53``); ``u_out``: the result's rounding to ``dtype``.
    """
    u_out = float(torch.finfo(dtype).eps) / 2
    if dtype in (torch.float16, torch.bfloat16):
        u_in = u_out
    elif device_type == "cuda" and dtype == torch.float32:
        u_in = {"highest": 0.0, "high": 2.0 ** -11}.get(matmul_precision, 2.0 ** -8)
    else:
        u_in = 0.0
    u_acc = float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps) / 2
    return u_in, u_acc, u_out


def factor_tolerance(H: torch.Tensor, E: torch.Tensor, reference: torch.Tensor,
                     roundoff: tuple[float, float, float]) -> torch.Tensor:
    """Per-entry bound on ``|h_c . e_i - ref[c, i]|`` from rounding alone (DESIGN §9.4).

    Each of the ``d`` products ``h_k e_k`` carries an input-rounding error of at most
    ``2 u_in |h_k e_k|``, and the float32 accumulation adds errors of the order of ``u_acc``
    times the partial sums; independent and of mean zero, they sum to a standard deviation of
    at most ``(2 u_in + d u_acc) s`` with ``s = sqrt(sum_k h_k^2 e_k^2)`` (for random factors
    ``s ~ ||h|| ||e|| / sqrt(d)``: the ``sqrt(d) eps ||h|| ||e||`` of the usual estimate). The
    result's own rounding adds ``u_out |ref|``. The check allows :data:`_FACTOR_SIGMAS` of the
    first and twice the second: about ``1.2e-2 s`` under TF32 and ``4.7e-2 s`` under bf16, where
    the former fixed ``rtol = 1e-5`` failed both.
    """
    u_in, u_acc, u_out = roundoff
    s = torch.sqrt(H.detach().double().square() @ E.detach().double().square().T)
    return (_FACTOR_SIGMAS * (2 * u_in + H.shape[-1] * u_acc) * s + 2 * u_out * reference.detach().double().abs()
            + torch.finfo(torch.float32).tiny)


_STREAMING_COST = ("using the streaming score path (slower: every score chunk is copied to the host as float64; "
                   "--compare then reports no matched-reduction p-values)")

#: the data-struct keys RecBole's own ``eval_batch_collect`` still fills for the plugin's collector
_RECBOLE_KEYS = frozenset({"rec.meanrank", "rec.score", "data.label"})


class _Only:
    """A view of a RecBole ``Register`` that needs only ``keys`` (of what it needed)."""

    def __init__(self, register: Any, keys: frozenset[str]) -> None:
        self._register, self._keys = register, keys

    def need(self, key: str) -> bool:
        return key in self._keys and bool(self._register.need(key))


def learned_scores(model: torch.nn.Module, interaction: Any) -> torch.Tensor:
    """The model's learned full-sort scores, without any prior term (DESIGN §3)."""
    method = getattr(model, "popprior_learned_scores", None)
    return method(interaction) if method is not None else model.full_sort_predict(interaction)


class EnergyState:
    """One evaluation's collected statistics; metrics read the (cached) results from it.

    Exactly one of ``contexts`` (factorised path, with the item table ``E``) or ``scores``
    (streaming fallback) is filled. Numeric fields are sums: see
    :meth:`PopPriorCollector.reduce_energy_stats` for distributed runs.
    """

    def __init__(self, log_prior: Any, windows_log_prior: Any, *, permutations: int, seed: int,
                 subspace_energy: float, with_subspace: bool) -> None:
        self.log_prior = log_prior
        self.windows_log_prior = windows_log_prior if with_subspace else None
        self.permutations = permutations
        self.seed = seed
        self.subspace_energy = subspace_energy
        self.contexts: ContextStats | None = None
        self.scores: ScoreStats | None = None
        self.E: torch.Tensor | np.ndarray | None = None
        self.path = "none"
        self.reduced = False  # statistics already summed over workers
        self._table_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._energy: dict[str, Any] | None = None
        self._embedding: dict[str, float] | None = None

    @property
    def m(self) -> int:
        if self.contexts is not None:
            return self.contexts.m
        return self.scores.m if self.scores is not None else 0

    def to_host(self) -> None:
        """Keep nothing on the model's device: ``E`` and the priors become float64 numpy (DESIGN §3.2:
        a finished ``--compare`` arm keeps these statistics, not its model)."""
        self._item_table()
        for name in ("log_prior", "windows_log_prior"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, as_float64(value))
        if self.scores is not None:
            for name in ("log_prior", "windows_log_prior"):
                value = getattr(self.scores, name)
                if isinstance(value, torch.Tensor):
                    setattr(self.scores, name, as_float64(value))

    def _item_table(self) -> np.ndarray:
        """``E`` as float64 numpy, converted once for every metric."""
        if self.E is not None and not isinstance(self.E, np.ndarray):
            self.E = as_float64(self.E)
        return self.E

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(E[1:], mean row, centred Gram)``, computed once for the energy and the embedding."""
        if self._table_cache is None:
            E = self._item_table()
            self._table_cache = item_table(E, E.shape[0], None)
        return self._table_cache

    def energy(self) -> dict[str, Any]:
        """DESIGN §3 energies (with permutations / subspace when they were requested)."""
        if self._energy is None:
            if self.path == "factorised":
                self._energy = energy_from_stats(
                    self.contexts, self._item_table(), self.log_prior, permutations=self.permutations,
                    seed=self.seed, windows_log_prior=self.windows_log_prior,
                    subspace_energy=self.subspace_energy, _table=self._table())
            elif self.path == "scores":
                self._energy = self.scores.result()
            else:
                raise PopPriorError("the energy metrics saw no evaluation contexts: evaluate through "
                                    "the plugin's trainer (recbole_popprior.trainer.get_trainer)")
            self._energy["path"] = self.path
        return self._energy

    def embedding(self) -> dict[str, float]:
        """DESIGN §4 embedding diagnostics (NaN where an input is unavailable)."""
        if self._embedding is None:
            if self.E is None:
                nan = float("nan")
                self._embedding = {"R1": nan, "erank": nan, "mean_cos": nan, "pc1_corr": nan,
                                   "balance_err": nan}
            else:
                G = self.contexts.G if self.contexts is not None else None
                self._embedding = embedding_diagnostics(self._item_table(), self.log_prior, G,
                                                        item_gram=self._table()[2])
        return self._embedding


class PopPriorCollector(FixedCollector):
    """RecBole's ``Collector`` (with the ``get_data_struct`` fix) plus the energy statistics."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.logger = logging.getLogger()
        self.stage = "test"
        need = self.register.need
        self._need_energy = bool(need(ENERGY_KEY))
        self._need_permutation = bool(need(PERMUTATION_KEY))
        self._need_subspace = bool(need(SUBSPACE_KEY))
        self._need_embedding = bool(need(EMBEDDING_KEY))
        self._need_targets = bool(need(TARGETS_KEY))
        self._need_model = self._need_energy or self._need_embedding
        # settings checked by config._validate; defaults in properties/overall.yaml
        self.permutations = int(config["energy_permutations"])
        self.permutation_stage = str(config["energy_permutation_stage"])
        self.max_contexts = config["energy_max_contexts"]
        self.subspace_energy = float(config["energy_subspace"])
        self.seed = int(config["energy_seed"])
        self.train_log_prior: torch.Tensor | None = None
        self.train_log_prior_windows: torch.Tensor | None = None
        self._default_factor_ok: dict[int, bool] = {}
        self._state: EnergyState | None = None
        #: the statistics of the latest evaluation (what its energy metrics were computed from)
        self.last_state: EnergyState | None = None
        self._target_rows: list[torch.Tensor] = []
        self._target_items: list[torch.Tensor] = []
        self._rows_seen = 0
        #: this evaluation's ``rec.items`` / ``rec.topk`` rows, concatenated in get_data_struct
        self._parts: dict[str, list[torch.Tensor]] = {}

    # --- RecBole hooks ---------------------------------------------------------------------
    def data_collect(self, train_data: Any) -> None:
        """RecBole's data, plus the training-target prior for models without ``log_prior``."""
        super().data_collect(train_data)
        if not self._need_model:
            return
        dataset = train_data.dataset
        items = dataset.inter_feat[self.config["ITEM_ID_FIELD"]]
        alpha = float(self.config["prior_alpha"])
        self.train_log_prior = estimate_log_prior(items, dataset.item_num, alpha)
        time_field = self.config["TIME_FIELD"]
        if self._need_subspace and time_field and time_field in dataset.inter_feat:
            windows = int(self.config["prior_windows"])
            by = self.config["prior_window_by"]
            self.train_log_prior_windows = estimate_windowed_log_prior(
                items, dataset.inter_feat[time_field], dataset.item_num, windows, by=by,
                alpha=alpha).log_prior

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i) -> None:
        """RecBole's per-batch collection, with ``rec.items`` and ``rec.topk`` computed without a
        ``[rows, n_items]`` temporary (:mod:`~recbole_popprior.evaluator.topk`, DESIGN §3.3): one
        exact top-k for both, the hits read at the top-k indices. ``rec.meanrank``, ``rec.score``
        and ``data.label`` are RecBole's own code. ``scores_tensor=None`` means the trainer
        already collected this batch chunk by chunk, so nothing is added."""
        if scores_tensor is None:
            return
        need = self.register.need
        top = exact_topk(scores_tensor, max(self.topk)) if need("rec.items") or need("rec.topk") else None
        self.topk_collect(top, positive_u, positive_i, scores_tensor.shape[1], rows=scores_tensor.shape[0])
        if self.needs_scores:
            register, self.register = self.register, _Only(self.register, _RECBOLE_KEYS)
            try:  # RecBole's method reads self.register.need; the two keys above are done already
                super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
            finally:
                self.register = register

    @property
    def needs_scores(self) -> bool:
        """Whether a metric reads more of the scores than their top-k (``rec.meanrank``,
        ``rec.score``, ``data.label``: RecBole's own collection)."""
        return any(self.register.need(key) for key in _RECBOLE_KEYS)

    def topk_collect(self, top: torch.Tensor | None, positive_u: torch.Tensor, positive_i: torch.Tensor,
                     n_items: int, rows: int | None = None) -> None:
        """``rec.items`` and ``rec.topk`` of a chunk from its top-k indices ``[rows, max(topk)]``
        (what :meth:`eval_batch_collect` computes from the scores; the trainer's low-precision
        scoring computes it itself, DESIGN §3.3)."""
        need = self.register.need
        if top is not None and need("rec.items"):
            self._parts.setdefault("rec.items", []).append(top)
        if top is not None and need("rec.topk"):
            self._parts.setdefault("rec.topk", []).append(topk_hits(top, positive_u, positive_i, n_items))
        if self._need_targets:
            self._target_rows.append(positive_u.detach().cpu().long() + self._rows_seen)
            self._target_items.append(positive_i.detach().cpu().long())
            self._rows_seen += int(rows if rows is not None else top.shape[0])

    @property
    def wants_contexts(self) -> bool:
        """Whether any configured metric needs the model's contexts (else context_collect is a no-op)."""
        return self._need_model

    def context_collect(self, model: torch.nn.Module, interaction: Any, scores: torch.Tensor,
                        positive_u: torch.Tensor, positive_i: torch.Tensor,
                        factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Accumulate this batch's contexts (or learned scores) for the energy metrics.

        ``factors``: the batch's ``(H, E)`` when the caller already computed them to build
        ``scores`` (saves the second forward pass that :meth:`_factors` would run).
        """
        if not self._need_model:
            return
        state = self._state or self._new_state(model)
        cap = self.context_cap()
        limit = scores.shape[0] if cap is None else min(scores.shape[0], cap - state.m)
        if limit <= 0:
            return
        if factors is None:
            factors = self._factors(model, interaction, scores)
        if factors is not None:
            H, E = factors
            if state.path == "scores":
                raise PopPriorError("model switched from score batches to factors within one evaluation")
            state.path = "factorised"
            state.E = E.detach()
            if self._need_energy or self._need_embedding:
                state.contexts = (state.contexts or ContextStats()).update(H[:limit])
            return
        if state.path == "factorised":
            raise PopPriorError("model switched from factors to score batches within one evaluation")
        state.path = "scores"
        if not self._need_energy:
            return
        Z = self._learned_scores_batch(model, interaction, scores)
        if state.scores is None:
            state.scores = ScoreStats(state.log_prior, permutations=state.permutations, seed=state.seed,
                                      windows_log_prior=state.windows_log_prior,
                                      subspace_energy=state.subspace_energy)
        state.scores.update(Z[:limit])

    def context_cap(self) -> int | None:
        """How many contexts this process keeps: ``energy_max_contexts`` in one process, and under
        DDP this rank's share of the same first ``energy_max_contexts`` contexts (DESIGN §9.3).

        The evaluation shards are unpadded and unshuffled (``distributed.unpad_eval_sampler``):
        rank ``r`` of ``W`` holds the contexts ``r, r + W, r + 2W, ...`` of the single-process
        order, so its ``k``-th context is one of the first ``M`` exactly when ``r + k W < M``.
        """
        if self.max_contexts is None:
            return None
        if not collective.is_distributed():
            return int(self.max_contexts)
        return len(range(collective.rank(), int(self.max_contexts), collective.world_size()))

    def model_collect(self, model: torch.nn.Module) -> None:
        """Item table for the embedding diagnostics when the contexts did not bring one."""
        if not self._need_embedding:
            return
        state = self._state or self._new_state(model)
        if state.E is None:
            table = getattr(getattr(model, "item_embedding", None), "weight", None)
            if isinstance(table, torch.Tensor) and table.dim() == 2:
                state.E = table.detach()

    def get_data_struct(self):
        """RecBole's struct (non-tensors left alone) plus this evaluation's ``popprior.*`` entries."""
        if self._need_model and collective.is_distributed():
            self.reduce_energy_stats(collective.all_reduce_array)
        for key, parts in self._parts.items():  # one concatenation per evaluation, not one per batch
            if key in self.data_struct:
                parts = [self.data_struct[key], *parts]
            self.data_struct.set(key, torch.cat(parts) if len(parts) > 1 else parts[0])
        self._parts = {}
        struct = super().get_data_struct()
        state, self._state = self._state, None
        if self._need_model:
            if state is None:
                state = EnergyState(None, None, permutations=0, seed=self.seed,
                                    subspace_energy=self.subspace_energy, with_subspace=False)
            for key, needed in ((ENERGY_KEY, self._need_energy), (PERMUTATION_KEY, self._need_permutation),
                                (SUBSPACE_KEY, self._need_subspace), (EMBEDDING_KEY, self._need_embedding)):
                if needed:
                    struct.set(key, state)
            self.last_state = state
        if self._need_targets:
            rows = torch.cat(self._target_rows) if self._target_rows else torch.empty(0, dtype=torch.long)
            items = torch.cat(self._target_items) if self._target_items else torch.empty(0, dtype=torch.long)
            struct.set(TARGETS_KEY, (rows, items))
            self._target_rows, self._target_items, self._rows_seen = [], [], 0
        return struct

    # --- distributed ---------------------------------------------------------------------
    def reduce_energy_stats(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """All-reduce this evaluation's sums in place: ``fn`` maps a float64 array to its sum over workers.

        ``get_data_struct`` calls it itself (with ``collective.all_reduce_array``) when a
        process group of several workers is running; a second call is a no-op. Every worker
        must have taken the same path (factorised or scores) and seen at least one batch.
        """
        state = self._state
        if state is None or state.reduced:
            return
        state.reduced = True
        if state.contexts is not None and state.contexts.G is not None:
            c = state.contexts
            c.G, c.hsum = fn(c.G), fn(c.hsum)
            c.m = int(round(float(fn(np.array([float(c.m)]))[0])))
        if state.scores is not None:
            s = state.scores
            s.flush()
            packed = fn(np.array([float(s.m), s.total, s.s_sum, s.s_sq]))
            s.m, s.total, s.s_sum, s.s_sq = int(round(packed[0])), float(packed[1]), float(packed[2]), float(packed[3])
            if s.null_sq.size:
                s.null_sq = fn(s.null_sq)
            if s.sub_sq is not None:
                s.sub_sq = fn(s.sub_sq)

    # --- helpers -------------------------------------------------------------------------
    def _run_permutations(self) -> bool:
        return self._need_permutation and self.permutations > 0 and (
            self.stage == "test" or self.permutation_stage in ("valid", "always"))

    def _new_state(self, model: torch.nn.Module) -> EnergyState:
        log_prior = getattr(model, "log_prior", None)
        if not isinstance(log_prior, torch.Tensor):
            log_prior = self.train_log_prior
        windows = getattr(model, "log_prior_windows", None)
        if not isinstance(windows, torch.Tensor):
            windows = self.train_log_prior_windows
        if log_prior is None and self._need_energy:
            raise PopPriorError("the energy metrics need a prior: the model has no log_prior and "
                                "data_collect(train_data) was not called")
        if windows is None and self._need_subspace:
            self.logger.warning("PopSubspace: no windowed prior (no time field); using the single "
                                "global prior, so the subspace is the popularity direction")
            windows = log_prior[None, :] if log_prior is not None else None
        self._state = EnergyState(
            log_prior, windows, permutations=self.permutations if self._run_permutations() else 0,
            seed=self.seed, subspace_energy=self.subspace_energy, with_subspace=self._need_subspace)
        return self._state

    def _factors(self, model, interaction, scores) -> tuple[torch.Tensor, torch.Tensor] | None:
        method = getattr(model, "popprior_factors", None)
        if method is not None:
            return method(interaction)
        key = id(model)
        name = type(model).__name__
        if self._default_factor_ok.get(key) is False:
            return None
        try:
            pair = factors(model, interaction)
        except Exception as exc:  # any model that does not fit its pattern takes the score path
            self.logger.warning(f"energy metrics: the (H, E) factorisation of {name} failed "
                                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                                f"{_STREAMING_COST}")
            pair = None
        if pair is None:
            if key not in self._default_factor_ok:
                self.logger.info(f"energy metrics: {name} has no H E^T factorisation; {_STREAMING_COST}")
            self._default_factor_ok[key] = False
            return None
        H, E = pair
        if key not in self._default_factor_ok:
            reason = self._verify_factors(H, E, learned_scores(model, interaction))
            self._default_factor_ok[key] = reason is None
            if reason is None:
                self.logger.info(f"energy metrics: {name} uses the factorised path")
            else:
                self.logger.warning(f"energy metrics: the factor check of {name} failed ({reason}); {_STREAMING_COST}")
                return None
        return H, E

    @staticmethod
    def _verify_factors(H: torch.Tensor, E: torch.Tensor, reference: torch.Tensor) -> str | None:
        """Why ``H E^T`` does not reproduce the learned scores within the rounding bound of
        :func:`factor_tolerance` (padding column excluded), or ``None`` when it does. Only the
        first rows are compared (at most :data:`_FACTOR_CHECK_ENTRIES` entries)."""
        if reference.dim() != 2 or reference.shape != (H.shape[0], E.shape[0]):
            return f"H E^T is {tuple(H.shape[:1]) + tuple(E.shape[:1])}, the learned scores {tuple(reference.shape)}"
        rows = max(1, min(H.shape[0], _FACTOR_CHECK_ENTRIES // max(1, E.shape[0])))
        H, ref, E = H[:rows], reference[:rows, 1:], E[1:]
        if not torch.isfinite(ref).all():
            return "its learned scores are not all finite"
        Z = H.detach().double() @ E.detach().double().T
        roundoff = score_roundoff(reference.dtype, reference.device.type, torch.get_float32_matmul_precision())
        excess = (Z - ref.double()).abs() / factor_tolerance(H, E, ref, roundoff)
        worst = float(excess.max())
        if worst <= 1.0:
            return None
        return (f"|H E^T - scores| reaches {worst:.3g} times the rounding bound of {reference.dtype} scores "
                "(DESIGN §9.4)")

    @staticmethod
    def _learned_scores_batch(model, interaction, scores: torch.Tensor) -> torch.Tensor:
        # RecBole's own models: the trainer's scores ARE the learned scores (padding column set
        # to -inf, which the energy ignores), unless it also masked history items.
        if getattr(model, "popprior_learned_scores", None) is None and torch.isfinite(scores[:, 1:]).all():
            return scores
        return learned_scores(model, interaction)


__all__ = ["PopPriorCollector", "EnergyState", "learned_scores"]
