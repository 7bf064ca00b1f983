"""The trainer mixin: RecBole's trainers with safe checkpoints, the energy collector,
full-sort evaluation in bounded memory and the autocast dtype of mixed precision.

``get_trainer(config)`` takes whatever trainer RecBole picks for the model (``Trainer``,
``S3RecTrainer``, ...) and puts :class:`PopPriorTrainerMixin` in front of it. Under DDP the
mixin also holds every rank after ``fit`` and keeps the energy metrics out of RecBole's
per-rank averaging (:mod:`recbole_popprior.collective`). Full-sort evaluation scores each
batch in row chunks whose measured peak stays under ``eval_score_budget_mb`` (docs/DESIGN.md §3,
bounded memory), into one reused score buffer and with RecBole's results computed without
``[rows, n_items]`` temporaries (DESIGN §3.3), for the plugin's models and RecBole's own alike.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch
from recbole.evaluator.register import metrics_dict
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_popprior import checkpoint, collective, compat
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.collector import PopPriorCollector
from recbole_popprior.evaluator.full_sort import ChunkPlan, FullSortScorer, mask_scores
from recbole_popprior.model.registry import recbole_model_name


class PopPriorTrainerMixin:
    """Checkpoints through :mod:`recbole_popprior.checkpoint` (state dict + plain metadata,
    ``weights_only=True``) and evaluation through the plugin's collector, which feeds the
    energy metrics with the model's contexts (DESIGN §3)."""

    def __init__(self, config, model):
        # RecBole's __init__ opens its SummaryWriter: under the run's folder when asked for (compat shim 8)
        folder = os.path.join(config["checkpoint_dir"], "log_tensorboard") if config["tensorboard"] else None
        with compat.tensorboard_under(folder):
            super().__init__(config, model)
        self.eval_collector = PopPriorCollector(config)
        self.eval_stage = "test"
        #: bytes one full-sort chunk may hold at its peak, everything counted (DESIGN §3, bounded memory)
        self.eval_score_budget = float(config["eval_score_budget_mb"]) * 2**20
        self._full_sort: tuple[FullSortScorer, ChunkPlan] | None = None
        #: how the latest full-sort evaluation scored (``FullSortScorer.path``)
        self.last_full_sort_path: str | None = None
        #: ``eval_score_dtype`` below float32 (DESIGN §3.3), else ``None`` (exact float32 scores)
        self.eval_score_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                                 "float16": torch.float16}[config["eval_score_dtype"]]
        self._warned: set[str] = set()
        self._last_low_precision = False
        #: each rank's SHA-256 of the trained weights after ``fit`` under DDP (empty without it)
        self.trained_weight_digests: list[str] = []
        self._init_precision(config)

    def _init_precision(self, config) -> None:
        """RecBole's ``enable_amp`` / ``enable_scaler``, with the plugin's ``amp_dtype`` (DESIGN §9.2).

        RecBole wraps each training step in ``torch.autocast(device_type)`` at the device's
        default dtype and builds a CUDA ``GradScaler`` whenever CUDA is visible: the scaler is
        kept for a CUDA device only (a CPU model's gradients are not CUDA tensors), and
        ``amp_dtype`` sets the autocast dtype for the training epoch.
        """
        self.enable_scaler = bool(self.enable_scaler) and self.device.type == "cuda"
        name = config["amp_dtype"] if "amp_dtype" in config else None
        #: the autocast dtype of the training steps (None: the device's default)
        self.amp_dtype: torch.dtype | None = getattr(torch, name) if name else None
        if self.enable_amp:
            dtype = self.amp_dtype or torch.get_autocast_dtype(self.device.type)
            if compat.breaks_under_autocast(self.model):
                self.logger.warning(f"enable_amp: {type(self.model).__name__} trains in float32 (RecBole's model "
                                    "fails under autocast: its scatter_ mixes dtypes)")
            elif dtype == torch.float16 and not self.enable_scaler:
                self.logger.warning("enable_amp trains in float16 without a gradient scaler: small gradients "
                                    "underflow to zero; set enable_scaler: True (or amp_dtype: bfloat16)")

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
        if self.enable_amp and compat.breaks_under_autocast(self.model):  # compat shim 9
            loss_func = compat.without_autocast(loss_func or self.model.calculate_loss, self.device.type)
        with autocast_dtype(self.device.type, self.amp_dtype if self.enable_amp else None):
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _check_nan(self, loss):
        """RecBole's NaN check, as one line: settings that make training diverge are bad input."""
        if torch.isnan(loss):
            raise PopPriorError("Training loss is nan: these settings make training diverge (e.g. learning_rate, "
                                "weight_decay or prior_tau too large)")

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
        self._full_sort = None  # a new scorer and chunk plan for every evaluation
        try:
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        finally:
            if self._full_sort is not None:
                self.last_full_sort_path = self._full_sort[0].path
                self._last_low_precision = self._full_sort[0].low_precision
            self._full_sort = None

    def _map_reduce(self, result, num_sample):
        # energy metrics come from statistics summed over ranks (the collector all-reduces
        # them), so they are global already; RecBole would average them per rank
        prefixes = collective.reduced_key_prefixes(metrics_dict.values())
        return collective.map_reduce(super()._map_reduce, result, num_sample, prefixes)

    def _full_sort_batch_eval(self, batched_data):
        """RecBole's full-sort scoring and collection, chunk by chunk (DESIGN §3).

        Each chunk is scored (:class:`~recbole_popprior.evaluator.full_sort.FullSortScorer`: the
        model's scores bit for bit, in one reused buffer where the model allows), masked as RecBole
        masks, and handed to the collector here, so ``scores`` is returned as ``None`` (the
        collector then skips RecBole's own call for the batch). Chunks hold as many contexts as
        fit ``eval_score_budget_mb``, measured (:class:`~recbole_popprior.evaluator.full_sort.ChunkPlan`).
        Top-k and every per-row metric are unchanged: each row is scored and ranked alone.
        """
        scorer, plan = self._full_sort_state()
        interaction, _, positive_u, positive_i = batched_data
        if plan.budget is None and len(interaction) * self.tot_item_num * 4 > self.eval_score_budget:
            self._warn_once("eval_score_budget_mb is not applied: a metric needs rec.score, "
                            "which keeps the whole [contexts, n_items] score matrix")
        if scorer.path is None:
            scorer.choose_path(interaction.to(self.device))
        total, start = len(interaction), 0
        while start < total:
            rows = plan.next_rows(total - start)
            with plan.measure(rows):
                self._score_and_collect(scorer, full_sort_slice(batched_data, start, start + rows))
            start += rows
        return interaction, None, positive_u, positive_i

    def _score_and_collect(self, scorer: FullSortScorer, chunk: tuple) -> None:
        interaction, history_index, positive_u, positive_i = chunk
        # move the batch first: the collector's forward must hit the cache on the moved tensors
        interaction = interaction.to(self.device)
        collector = self.eval_collector
        with reuse_forward(self.model) if collector.wants_contexts else contextlib.nullcontext():
            top = None
            if scorer.path == "recbole":  # no full_sort_predict: RecBole's pointwise fallback
                scores = super()._full_sort_batch_eval((interaction, history_index, positive_u, positive_i))[1]
            elif scorer.low_precision:  # eval_score_dtype: the top-k comes re-scored from the scorer
                top, scores = scorer.score_topk(interaction, history_index, max(collector.topk))
            else:
                scores = scorer.score(interaction)
                mask_scores(scores, history_index)
            # scoring and the energy metrics share one forward pass (the energy statistics come
            # from the collector's own float64 view of H and E, whatever the scores' dtype)
            collector.context_collect(self.model, interaction, scores, positive_u, positive_i)
        if top is None:
            collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        else:
            collector.topk_collect(top, positive_u, positive_i, self.tot_item_num, rows=len(interaction))

    def _full_sort_state(self) -> tuple[FullSortScorer, ChunkPlan]:
        """This evaluation's scorer and chunk plan (made on its first batch)."""
        state = getattr(self, "_full_sort", None)
        if state is None:
            # metrics that read rec.score keep every score of the evaluation: no chunking bounds them
            budget = None if self.eval_collector.register.need("rec.score") else self.eval_score_budget
            dtype = self.eval_score_dtype
            if dtype is not None and self.eval_collector.needs_scores:
                self._warn_once(f"eval_score_dtype={self.config['eval_score_dtype']} is not applied: a metric "
                                "reads the scores beyond their top-k (GAUC, rec.score); scoring in float32")
                dtype = None
            scorer = FullSortScorer(self.model, self.tot_item_num, self.logger, score_dtype=dtype)
            state = (scorer, ChunkPlan(budget, self.tot_item_num, self.logger, held=scorer.held_bytes))
            self._full_sort = state
        return state

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.logger.warning(message)


def full_sort_slice(batched_data: tuple, start: int, end: int) -> tuple:
    """Rows ``start:end`` of ``(interaction, history_index, positive_u, positive_i)``.

    ``positive_u`` and the row part of ``history_index`` index rows within the batch, so the
    chunk's are selected and shifted to its own first row.
    """
    interaction, history_index, positive_u, positive_i = batched_data
    mine = (positive_u >= start) & (positive_u < end)
    history = None
    if history_index is not None:
        row_idx, col_idx = history_index
        keep = (row_idx >= start) & (row_idx < end)
        history = (row_idx[keep] - start, col_idx[keep])
    return interaction[start:end], history, positive_u[mine] - start, positive_i[mine]


def split_full_sort_batch(batched_data: tuple, rows: int) -> Iterator[tuple]:
    """``(interaction, history_index, positive_u, positive_i)`` in chunks of ``rows`` contexts."""
    for start in range(0, len(batched_data[0]), rows):
        yield full_sort_slice(batched_data, start, min(start + rows, len(batched_data[0])))


@contextlib.contextmanager
def autocast_dtype(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, ``torch.autocast(device_type)`` without a dtype (as RecBole's training
    step enters it) runs in ``dtype``; ``None`` leaves the device's default. Restored on exit."""
    if dtype is None:
        yield
        return
    previous = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, previous)


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
