"""The trainer mixin: RecBole's trainers with safe checkpoints, the energy collector and
full-sort evaluation in bounded memory.

``get_trainer(config)`` takes whatever trainer RecBole picks for the model (``Trainer``,
``S3RecTrainer``, ...) and puts :class:`PopPriorTrainerMixin` in front of it. Under DDP the
mixin also holds every rank after ``fit`` and keeps the energy metrics out of RecBole's
per-rank averaging (:mod:`recbole_popprior.collective`). Full-sort evaluation scores each
batch in row chunks of at most ``eval_score_budget_mb`` of float32 scores (docs/DESIGN.md §3,
bounded memory), for the plugin's models and RecBole's own alike.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from recbole.evaluator.register import metrics_dict
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_popprior import checkpoint, collective
from recbole_popprior.evaluator.collector import PopPriorCollector
from recbole_popprior.model.registry import recbole_model_name


class PopPriorTrainerMixin:
    """Checkpoints through :mod:`recbole_popprior.checkpoint` (state dict + plain metadata,
    ``weights_only=True``) and evaluation through the plugin's collector, which feeds the
    energy metrics with the model's contexts (DESIGN §3)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = PopPriorCollector(config)
        self.eval_stage = "test"
        #: bytes of float32 full-sort scores one scoring step may hold (DESIGN §3, bounded memory)
        self.eval_score_budget = float(config["eval_score_budget_mb"]) * 2**20
        self._warned_unbounded = False
        #: each rank's SHA-256 of the trained weights after ``fit`` under DDP (empty without it)
        self.trained_weight_digests: list[str] = []

    def fit(self, *args, **kwargs):
        """RecBole's ``fit``, then (under DDP) wait until rank 0 has written the best checkpoint.

        Only rank 0 saves (trainer.py ~L296), right after the last validation's collective;
        without this barrier another rank could load the best model for testing before it is
        on disk, or an older one (RecBole 1.2.1 has the same race). Every rank's digest of its
        trained weights is gathered on the way: they are equal when DDP kept the replicas in step.
        """
        outcome = super().fit(*args, **kwargs)
        if collective.is_distributed():  # a hash of every weight is only worth it to compare ranks
            self.trained_weight_digests = collective.all_gather(collective.state_digest(self.model))
        collective.barrier()
        return outcome

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's epoch, after ``model.on_epoch_start(epoch)`` for models with per-epoch state
        (Adap-tau's temperatures, DESIGN §7.2); the trainer knows nothing model-specific."""
        hook = getattr(self.model, "on_epoch_start", None)
        if hook is not None:
            hook(epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    # --- checkpoints (compat shim 3) -----------------------------------------------------
    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        checkpoint.save_checkpoint(
            saved_model_file, self.model, config=self.config, optimizer=self.optimizer,
            epoch=epoch, cur_step=self.cur_step, best_valid_score=self.best_valid_score)
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")

    def save_pretrained_model(self, epoch, saved_model_file):
        checkpoint.save_checkpoint(saved_model_file, self.model, config=self.config,
                               optimizer=self.optimizer, epoch=epoch)
        self.saved_model_file = saved_model_file

    def resume_checkpoint(self, resume_file):
        state = checkpoint.load_checkpoint(resume_file, map_location=self.device)
        checkpoint.restore_model(self.model, state, resume_file)
        meta = state["meta"]
        self.saved_model_file = str(resume_file)
        self.start_epoch = int(meta.get("epoch", -1)) + 1
        self.cur_step = int(meta.get("cur_step", 0))
        self.best_valid_score = meta.get("best_valid_score", self.best_valid_score)
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def load_model_file(self, model_file: str | None = None) -> None:
        """Load weights from ``model_file`` (default: this run's best checkpoint)."""
        model_file = model_file or self.saved_model_file
        state = checkpoint.load_checkpoint(model_file, map_location=self.device)
        checkpoint.restore_model(self.model, state, model_file)
        self.logger.info(f"Loading model structure and parameters from {model_file}")

    # --- evaluation ----------------------------------------------------------------------
    def _valid_epoch(self, valid_data, show_progress=False):
        self.eval_stage = "valid"
        try:
            return super()._valid_epoch(valid_data, show_progress=show_progress)
        finally:
            self.eval_stage = "test"

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self.load_model_file(model_file)
        self.eval_collector.stage = self.eval_stage
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _map_reduce(self, result, num_sample):
        # energy metrics come from statistics summed over ranks (the collector all-reduces
        # them), so they are global already; RecBole would average them per rank
        prefixes = collective.reduced_key_prefixes(metrics_dict.values())
        return collective.map_reduce(super()._map_reduce, result, num_sample, prefixes)

    def _full_sort_batch_eval(self, batched_data):
        """RecBole's full-sort scoring, in row chunks when the batch's scores exceed the budget.

        A chunked batch is handed to the collector chunk by chunk here, and ``scores`` is
        returned as ``None`` (the collector then skips RecBole's own call for that batch).
        Top-k and every per-row metric are unchanged: each row is scored and ranked alone.
        """
        rows = self._chunk_rows(len(batched_data[0]))
        if rows is None:
            return self._score_batch(batched_data)
        for chunk in split_full_sort_batch(batched_data, rows):
            interaction, scores, positive_u, positive_i = self._score_batch(chunk)
            self.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        interaction, _, positive_u, positive_i = batched_data
        return interaction, None, positive_u, positive_i

    def _score_batch(self, batched_data):
        if not self.eval_collector.wants_contexts:
            return super()._full_sort_batch_eval(batched_data)
        # move the batch first: RecBole scores a moved copy but returns the host batch, on which
        # the collector's forward would miss the cache (and meet the weights on another device)
        batched_data = (batched_data[0].to(self.device), *batched_data[1:])
        with reuse_forward(self.model):  # scoring and the energy metrics share one forward pass
            result = super()._full_sort_batch_eval(batched_data)
            self.eval_collector.context_collect(self.model, *result)
        return result

    def _chunk_rows(self, batch_rows: int) -> int | None:
        """Rows per scoring chunk, or ``None`` when the whole batch fits (or must stay whole)."""
        rows = max(1, int(self.eval_score_budget // (4 * self.tot_item_num)))
        if batch_rows <= rows:
            return None
        if self.eval_collector.register.need("rec.score"):
            # such metrics keep every score of the evaluation: no chunking can bound them
            if not self._warned_unbounded:
                self.logger.warning("eval_score_budget_mb is not applied: a metric needs rec.score, "
                                    "which keeps the whole [contexts, n_items] score matrix")
                self._warned_unbounded = True
            return None
        return rows


def split_full_sort_batch(batched_data: tuple, rows: int) -> Iterator[tuple]:
    """``(interaction, history_index, positive_u, positive_i)`` in chunks of ``rows`` contexts.

    ``positive_u`` and the row part of ``history_index`` index rows within the batch, so each
    chunk's are selected and shifted to its own first row.
    """
    interaction, history_index, positive_u, positive_i = batched_data
    for start in range(0, len(interaction), rows):
        end = min(start + rows, len(interaction))
        mine = (positive_u >= start) & (positive_u < end)
        history = None
        if history_index is not None:
            row_idx, col_idx = history_index
            keep = (row_idx >= start) & (row_idx < end)
            history = (row_idx[keep] - start, col_idx[keep])
        yield interaction[start:end], history, positive_u[mine] - start, positive_i[mine]


@contextlib.contextmanager
def reuse_forward(model: torch.nn.Module):
    """Within the block, ``model.forward`` called again on the very same input tensors returns
    the first call's output instead of running the network again.

    Why: RecBole's ``full_sort_predict`` runs ``forward`` and keeps only the scores, and the
    energy metrics need that forward's context vectors ``H``; no model exposes them, so the
    second call (from :mod:`recbole_popprior.model.factors`) is answered from this cache.
    RecBole models call ``self.forward(...)``, so an instance attribute shadows the class's
    method for the block (any model: the plugin's or RecBole's own); patching the class
    instead would answer any other model of the class, run on the same batch within the block
    (a second arm or seed), from this one's cache (tests/test_dispatch.py pins it; DESIGN §1.1).
    Only identity of the
    inputs counts, which is sound inside one ``no_grad`` evaluation batch (no weights change
    and the same tensors mean the same batch); the wrapper and its cache go on exit.
    """
    original = model.forward
    cache: list[tuple[tuple, dict, Any]] = []

    def forward(*args, **kwargs):
        for cached_args, cached_kwargs, output in cache:
            if (len(cached_args) == len(args) and all(a is b for a, b in zip(cached_args, args))
                    and cached_kwargs.keys() == kwargs.keys()
                    and all(cached_kwargs[k] is v for k, v in kwargs.items())):
                return output
        output = original(*args, **kwargs)
        cache.append((args, kwargs, output))
        return output

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


@functools.lru_cache(maxsize=None)
def _trainer_class(base: type) -> type:
    return type(base.__name__, (PopPriorTrainerMixin, base), {"__module__": __name__})


def get_trainer(config: Any) -> type:
    """RecBole's trainer class for the model (by its record's name: ``MySASRec(S3Rec)`` trains with
    ``S3RecTrainer``), with :class:`PopPriorTrainerMixin`."""
    return _trainer_class(recbole_get_trainer(config["MODEL_TYPE"], recbole_model_name(config)))
