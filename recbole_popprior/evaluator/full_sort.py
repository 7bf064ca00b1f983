"""Full-sort evaluation chunks: RecBole's scores in one reusable buffer, and chunks sized by a
measured peak (docs/DESIGN.md §3, bounded memory and §3.3, speed).

:class:`FullSortScorer` gives each chunk's ``[rows, n_items]`` scores. On its first call it
compares, on two contexts, the model's own ``full_sort_predict`` with ``H @ E.T`` (plus the
model's serving prior term) from the model's factors: when the two are bit for bit equal it
scores every chunk that way, with the matmul writing into one buffer kept for the evaluation and
the prior added in place (``torch.matmul(H, E.T, out=buffer).add_(term)`` are the same kernels as
``H @ E.T + term``, so the floats are the same). Otherwise it calls ``full_sort_predict``.
Why not always the model's call: glibc maps a fresh 1 GB output per chunk and faults it in page
by page, which made the same matmul 1.7x slower than into a kept buffer on this project's CPU
(benchmarks/bench_eval_step.py, "matmul").

:class:`ChunkPlan` sizes the chunks so that the peak of one chunk, everything counted, stays
under ``eval_score_budget_mb``: the first chunks of an evaluation (1, 2 and 4 contexts) are
measured exactly (:class:`~recbole_popprior.memory.TensorPeak`: the scores, the model's forward
or ``full_sort_predict``, the prior, the masks, the top-k and the metric collection, the energy
statistics), and ``peak(rows) = fixed + rows * per_row`` from the 2- and 4-context chunks is
solved for the rows that fit, less the scratch no tensor shows (``torch.topk``'s per-thread work
vector over one row).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch

from recbole_popprior.evaluator.topk import candidate_topk
from recbole_popprior.memory import TensorPeak
from recbole_popprior.model.factors import factors

#: contexts in the measured chunks that start every evaluation: the first one meets every one-off
#: allocation (caches, the energy collector's factor check), the fit uses the other two
PROBE_ROWS = (1, 2, 4)
#: contexts the scorer compares with the model's own full_sort_predict before choosing its path
CHECK_ROWS = 2
#: bytes of one (value, index) pair in torch.topk's per-thread CPU work vector
_TOPK_PAIR_BYTES = 16


class ChunkPlan:
    """Rows per full-sort chunk under ``budget`` bytes (``None``: whole batches, unbounded)."""

    def __init__(self, budget: float | None, n_items: int, logger: logging.Logger | None = None,
                 held: Callable[[], int] | None = None) -> None:
        self.budget = budget
        self.n_items = n_items
        self.logger = logger or logging.getLogger()
        #: bytes held between chunks that the measured chunks do not allocate (the scorer's tables)
        self.held = held or (lambda: 0)
        #: (rows, peak bytes) of the measured chunks
        self.samples: list[tuple[int, int]] = []
        self.fixed: float | None = None
        self.per_row: float | None = None
        self.rows: int | None = None
        #: bytes no tensor shows: torch.topk's work vector over one row, per thread
        self.scratch = torch.get_num_threads() * n_items * _TOPK_PAIR_BYTES

    def next_rows(self, remaining: int) -> int:
        if self.budget is None:
            return remaining
        if self.rows is None:
            return min(PROBE_ROWS[len(self.samples)], remaining)
        return min(self.rows, remaining)

    @contextlib.contextmanager
    def measure(self, rows: int) -> Iterator[None]:
        """Run one chunk; the first ones (until the fit is known) under :class:`TensorPeak`."""
        if self.budget is None or self.rows is not None or rows != PROBE_ROWS[len(self.samples)]:
            yield
            return
        with TensorPeak() as peak:
            yield
        self.samples.append((rows, peak.peak))
        if len(self.samples) == len(PROBE_ROWS):
            self._fit()

    def _fit(self) -> None:
        (r1, p1), (r2, p2) = self.samples[-2:]
        self.per_row = max((p2 - p1) / (r2 - r1), 0.0)
        self.fixed = max(p1 - r1 * self.per_row, p2 - r2 * self.per_row, 0.0) + self.held()
        room = self.budget - self.fixed - self.scratch
        rows = int(room // self.per_row) if self.per_row > 0 else 2**31
        if rows < 1:
            self.logger.warning(
                f"eval_score_budget_mb={self.budget / 2**20:g} is below the peak of one full-sort context "
                f"({(self.fixed + self.scratch + self.per_row) / 2**20:,.3g} MB measured): "
                "scoring one context at a time")
        self.rows = max(rows, 1)


def scoring_factors(model: torch.nn.Module, interaction: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's ``(H, E)`` (the plugin's ``popprior_factors``, else the factor table), or ``None``."""
    method = getattr(model, "popprior_factors", None)
    try:
        return method(interaction) if method is not None else factors(model, interaction)
    except Exception:  # a model that does not fit the table's pattern: its own full_sort_predict
        return None


class FullSortScorer:
    """One evaluation's full-sort scores (module docstring). ``path`` is ``"factors"`` (the
    buffer), ``"model"`` (``full_sort_predict``) or ``"recbole"`` (RecBole's own
    ``_full_sort_batch_eval``, for a model without ``full_sort_predict``), set on the first call."""

    def __init__(self, model: torch.nn.Module, n_items: int, logger: logging.Logger | None = None,
                 score_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.n_items = n_items
        self.logger = logger or logging.getLogger()
        #: ``eval_score_dtype`` below float32: the low-precision scoring of :meth:`score_topk`
        self.score_dtype = score_dtype
        self.path: str | None = None
        self._buffer: torch.Tensor | None = None
        self._dtype, self._device = torch.float32, torch.device("cpu")
        self._table: tuple[tuple, torch.Tensor] | None = None

    def choose_path(self, interaction: Any) -> str:
        """Compare ``H @ E.T (+ term)`` with ``full_sort_predict`` on the first contexts, bit for bit."""
        if self.path is not None:
            return self.path
        probe = interaction[: min(CHECK_ROWS, len(interaction))]
        try:
            reference = self.model.full_sort_predict(probe)
        except NotImplementedError:
            self.path = "recbole"
            return self.path
        reference = reference.reshape(len(probe), -1)
        pair = scoring_factors(self.model, probe)
        same = False
        if pair is not None and reference.shape[1] == self.n_items:
            self._dtype, self._device = pair[0].dtype, pair[0].device
            out = torch.empty(pair[0].shape[0], self.n_items, dtype=self._dtype, device=self._device)
            ours = self._factor_scores(*pair, out=out)
            try:
                same = ours.shape == reference.shape and ours.dtype == reference.dtype and torch.equal(ours, reference)
            except NotImplementedError:  # a device without comparisons (``meta``): the model's own call
                same = False
        self.path = "factors" if same else "model"
        self.logger.debug(f"full-sort scoring of {type(self.model).__name__}: "
                          f"{'H E^T into one buffer' if same else 'its own full_sort_predict'}")
        return self.path

    def score(self, interaction: Any) -> torch.Tensor:
        """``[rows, n_items]`` scores of one chunk, the prior included, unmasked."""
        if self.choose_path(interaction) == "factors":
            # the buffer first: it is held while the forward runs, in every chunk after the first
            out = self._rows(len(interaction))
            pair = scoring_factors(self.model, interaction)
            if pair is not None and pair[0].shape[0] == out.shape[0] and pair[0].dtype == out.dtype:
                return self._factor_scores(*pair, out=out)
        return self.model.full_sort_predict(interaction).reshape(len(interaction), self.n_items)

    @property
    def low_precision(self) -> bool:
        """Whether chunks take :meth:`score_topk` (a lower ``score_dtype`` on the factors path)."""
        return self.path == "factors" and self.score_dtype not in (None, self._dtype)

    def score_topk(self, interaction: Any, history_index: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-precision scoring (``eval_score_dtype``, DESIGN §3.3): ``(top [rows, k], masked
        low-precision scores)``. The matmul, the prior and the masks run in ``score_dtype`` over the
        catalogue; its best ``4 k + 32`` items per row are re-scored in the factors' own dtype
        (``h . e_i + beta log p_hat(i)``, masked items kept at ``-inf``) and ranked exactly."""
        low = self._rows(len(interaction))  # before the forward, as in score()
        H, E = scoring_factors(self.model, interaction)
        torch.matmul(H.to(self.score_dtype), self._low_table(E).T, out=low)
        term_of = getattr(self.model, "serving_prior_term", None)
        term_low = term_of(self.n_items, low) if term_of is not None else None
        if term_low is not None:
            low.add_(term_low)
        mask_scores(low, history_index)
        candidates = candidate_topk(low, min(4 * k + 32, self.n_items))
        exact = torch.bmm(E[candidates], H.unsqueeze(-1)).squeeze(-1)
        term = term_of(self.n_items, H) if term_of is not None else None
        if term is not None:
            exact.add_(term[candidates])
        exact.masked_fill_(low.gather(1, candidates) == -torch.inf, -torch.inf)
        top = candidates.gather(1, torch.topk(exact, k, dim=-1).indices)
        return top, low

    def _low_table(self, E: torch.Tensor) -> torch.Tensor:
        """``E`` in ``score_dtype``, converted once per evaluation (while ``E`` is unchanged)."""
        key = (E.data_ptr(), E._version, tuple(E.shape))
        if self._table is None or self._table[0] != key:
            self._table = None
            self._table = (key, E.detach().to(self.score_dtype))
        return self._table[1]

    def held_bytes(self) -> int:
        """Bytes this scorer keeps between chunks besides its buffer (the low-precision table)."""
        return 0 if self._table is None else self._table[1].numel() * self._table[1].element_size()

    def _factor_scores(self, H: torch.Tensor, E: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(H, E.T, out=out)
        term_of = getattr(self.model, "serving_prior_term", None)
        term = term_of(scores.shape[1], scores) if term_of is not None else None
        if term is not None:
            scores.add_(term)
        return scores

    def _rows(self, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of the evaluation's buffer (grown when a chunk needs more)."""
        dtype = self.score_dtype if self.low_precision else self._dtype
        if self._buffer is None or self._buffer.shape[0] < rows or self._buffer.dtype != dtype:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(rows, self.n_items, dtype=dtype, device=self._device)
        return self._buffer[:rows]

    def release(self) -> None:
        self._buffer = None


def mask_scores(scores: torch.Tensor, history_index: Any) -> torch.Tensor:
    """RecBole's masks, in place: the padding column and the batch's history items to ``-inf``.

    The history goes in as flat positions (``index_fill_``), the same entries RecBole's
    ``scores[history_index] = -inf`` sets, about 30x faster on the CPU than its two-tensor index.
    """
    scores[:, 0] = -torch.inf
    if history_index is not None:
        rows, columns = history_index
        if scores.is_contiguous():
            flat = rows.to(scores.device, torch.int64) * scores.shape[1] + columns.to(scores.device, torch.int64)
            scores.view(-1).index_fill_(0, flat, -torch.inf)
        else:
            scores[history_index] = -torch.inf
    return scores


__all__ = ["ChunkPlan", "FullSortScorer", "PROBE_ROWS", "mask_scores", "scoring_factors"]
