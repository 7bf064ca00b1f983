"""Every way a RecBole sequential model differs from the generic path, and why, in one place.

The generic path (:class:`~recbole_popprior.model.mixin.PriorSeparatedMixin`) wraps
``self.loss_fct``; that covers every model that builds ``[B, n_items]`` logits and calls it
(and, with ``loss_type: BPR``, every model that calls it with a positive and a negative score),
and serving adds ``beta * log p_hat`` to ``full_sort_predict``/``predict`` (docs/DESIGN.md §1).
Generic models are built as ``type(name, (PriorSeparatedMixin, ModelClass), {})``
(:func:`recbole_popprior.model.get_model`).

The classes below are the models that differ, as plain subclasses of the mixin and RecBole's
class, under RecBole's name (so RecBole's name-based lookups keep working). Each is its model's
``special_class`` in the registry (:mod:`.zoo`), which also holds the one-line note of every model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model import sequential_recommender as recbole_seq
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_popprior import checkpoint, compat
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.mixin import PriorSeparatedMixin
from recbole_popprior.model.objective import at_least_float32
from recbole_popprior.prior import WindowedPrior

compat.disable_anomaly_detection()  # importing RecBole's sine.py switched it on (compat shim 6)


class _ProbabilityModel(PriorSeparatedMixin):
    """GRU4RecCPR, SASRecCPR and RepeatNet output probabilities ``p(i|c)`` and pass
    ``log(p + 1e-8)`` to their loss (CE, NLLLoss or ``F.nll_loss``). Training adds
    ``tau log p_hat`` in log space and renormalises with ``log_softmax``. Serving keeps
    probabilities: ``softmax(log p(i|c) + beta log p_hat(i))``, a monotone transform of the
    log-space score ``log p + beta log p_hat`` (``p * p_hat^beta`` for pointwise
    ``predict``). The learned scores for the energy metrics are ``log(p + 1e-8)``; there is
    no ``H E^T`` factorisation (mixtures of softmaxes)."""

    prior_loss_attrs = {"loss_fct": True}
    prior_scores_are_probabilities = True


class GRU4RecCPR(_ProbabilityModel, recbole_seq.GRU4RecCPR):
    """Prior-separated GRU4RecCPR (a probability model, see :class:`_ProbabilityModel`)."""


class SASRecCPR(_ProbabilityModel, recbole_seq.SASRecCPR):
    """Prior-separated SASRecCPR (a probability model, see :class:`_ProbabilityModel`)."""


class RepeatNet(_ProbabilityModel, recbole_seq.RepeatNet):
    """Prior-separated RepeatNet (a probability model, see :class:`_ProbabilityModel`)."""


class SINE(PriorSeparatedMixin, recbole_seq.SINE):
    """With ``loss_type: NLL`` SINE passes ``log_softmax`` outputs to ``NLLLoss``, so the prior
    is added in log space and renormalised (``log_softmax`` again), which equals CE over
    ``logits + tau log p_hat``. Its interest temperature ``self.tau`` stays RecBole's."""

    @property
    def prior_loss_attrs(self) -> dict[str, bool]:
        return {"loss_fct": self.loss_type == "NLL"}


class BERT4Rec(PriorSeparatedMixin, recbole_seq.BERT4Rec):
    """BERT4Rec builds a local ``nn.CrossEntropyLoss`` inside ``calculate_loss`` (the
    ``loss_fct`` hook never sees it), adds an item ``output_bias`` and has an n_items+1 table
    (the last row is the mask token, which is never a target and is dropped from the logits).

    Training (CE) is re-expressed here with RecBole's own pieces: ``logits = H E[:n]^T +
    output_bias + tau log p_hat``, CE over the masked positions (``masked_index > 0``, as
    RecBole counts them). Windowed priors: each masked target uses the window of its OWN
    interaction time (``timestamp_list`` at the masked position), falling back to the
    window of the sequence's target time when the time list is not loaded. BPR is RecBole's
    inline loss over the masked slots with ``tau log p_hat`` added to each score (DESIGN §6.2).
    Factors: ``H' = [H, 1]``, ``E' = [E[:n], output_bias]``.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._list_suffix = config["LIST_SUFFIX"]

    def calculate_loss(self, interaction):
        if self.training_objective is not None:
            return super().calculate_loss(interaction)
        if self.loss_type == "BPR":
            return self._pairwise_loss(interaction)
        masked_item_seq = interaction[self.MASK_ITEM_SEQ]
        pos_items = interaction[self.POS_ITEMS]
        masked_index = interaction[self.MASK_INDEX]
        seq_output = self.forward(masked_item_seq)  # [B L H]
        gathered = seq_output.gather(
            1, masked_index.unsqueeze(-1).expand(-1, -1, seq_output.shape[-1]))  # [B mask_len H]
        logits = gathered @ self.item_embedding.weight[: self.n_items].T + self.output_bias
        logits = logits.reshape(-1, self.n_items)  # [B*mask_len, n_items]
        if self.prior_windowed:
            self._train_window_ids = self._masked_window_ids(interaction, masked_index)
        try:
            logits = self.add_training_prior(logits)
        finally:
            self._train_window_ids = None
        # RecBole's reduction, sum(CE * w) / sum(w) over every slot (bert4rec.py ~L200): rows are
        # weighted, not indexed away (a boolean index waits for the device, DESIGN §9.1); an empty
        # slot looks up item 1, since its own target 0 has a -inf prior and 0 * inf is NaN
        weights = (masked_index > 0).reshape(-1)
        targets = pos_items.reshape(-1)
        rows = F.cross_entropy(logits, torch.where(weights, targets, torch.ones_like(targets)), reduction="none")
        weights = weights.to(rows.dtype)
        return torch.sum(rows * weights) / torch.sum(weights)

    def _pairwise_loss(self, interaction) -> torch.Tensor:
        """RecBole's inline BPR over the masked slots (bert4rec.py ~L183), each score plus
        ``tau log p_hat`` of its item (its slot's window when windowed; DESIGN §6.2)."""
        masked_item_seq = interaction[self.MASK_ITEM_SEQ]
        pos_items, neg_items = interaction[self.POS_ITEMS], interaction[self.NEG_ITEMS]
        masked_index = interaction[self.MASK_INDEX]
        seq_output = self.forward(masked_item_seq)
        # the masked slots' outputs: RecBole multiplies by a one-hot map (bmm), built with a host
        # index tensor (multi_hot_embed); a gather gives the same numbers on the device
        seq_output = seq_output.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, seq_output.shape[-1]))
        pos_score = torch.sum(seq_output * self.item_embedding(pos_items), dim=-1) + self.output_bias[pos_items]
        neg_score = torch.sum(seq_output * self.item_embedding(neg_items), dim=-1) + self.output_bias[neg_items]
        pos_score, neg_score = at_least_float32(pos_score), at_least_float32(neg_score)  # DESIGN §9.2
        if self.prior_tau_learned or self.prior_tau != 0.0:
            window_ids = None
            if self.prior_windowed:
                window_ids = self._masked_window_ids(interaction, masked_index).to(pos_items.device)
            pos_score = pos_score + self._slot_prior(pos_items, window_ids)
            neg_score = neg_score + self._slot_prior(neg_items, window_ids)
        targets = (masked_index > 0).float()
        return -torch.sum(torch.log(1e-14 + torch.sigmoid(pos_score - neg_score)) * targets) / torch.sum(targets)

    def reconstruct_test_data(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """RecBole's (bert4rec.py ~L110): the mask token after each sequence's last item. RecBole
        writes it row by row in a Python loop over ``item_seq_len``, which reads every length back
        from the device; one scatter writes the same tokens (DESIGN §9.1)."""
        padded = torch.cat((item_seq, item_seq.new_zeros(item_seq.size(0), 1)), dim=-1)  # [B max_len+1]
        padded = padded.scatter(1, item_seq_len.reshape(-1, 1).long(),
                                torch.full_like(padded[:, :1], self.mask_token))
        return padded[:, 1:]

    def _slot_prior(self, items: torch.Tensor, window_ids: torch.Tensor | None) -> torch.Tensor:
        # padding slots hold item 0, whose log prior is -inf; they carry weight 0 in the loss, but
        # -inf - -inf is NaN, and a masked -inf still sends 0 * -inf = NaN into a learned tau's
        # gradient: look padding up at item 1 and zero it, so no -inf is ever computed
        term = self.prior_at_targets(items.reshape(-1).clamp_min(1), window_ids).reshape(items.shape)
        return torch.where(items > 0, term, torch.zeros_like(term))

    def _masked_window_ids(self, interaction, masked_index: torch.Tensor) -> torch.Tensor:
        time_list = self._time_field + self._list_suffix
        if time_list in interaction:
            times = interaction[time_list].gather(1, masked_index)  # [B mask_len]
        else:
            times = interaction[self._time_field].unsqueeze(1).expand_as(masked_index)
        return WindowedPrior(self.log_prior_windows, self.prior_window_edges).window_of(
            times.reshape(-1).to(self.prior_window_edges.device))

    def prior_window_ids(self, interaction):
        # the generic per-example ids are not used: calculate_loss sets per-position ids
        return None

    def training_window_ids(self, interaction) -> torch.Tensor:
        """One window per masked slot (the factorised path keeps the slots that count)."""
        return self._masked_window_ids(interaction, interaction[self.MASK_INDEX])


#: state-dict entries owned by the plugin (not RecBole's model)
PRIOR_STATE_KEYS = frozenset({"log_prior", "log_prior_windows", "prior_window_edges", "prior_tau"})


class S3Rec(PriorSeparatedMixin, recbole_seq.S3Rec):
    """S3Rec's table has n_items+1 rows (mask token last) and its fine-tune logits span all of
    them, so the training prior covers ``n_items + 1`` columns with the mask column at
    ``-inf`` (it is never a target). The pretrain stage has no item softmax: no prior there
    (its BCE losses are left alone). The pretrained checkpoint is read with
    :func:`recbole_popprior.checkpoint.load_checkpoint` (``weights_only=True``, one-line error
    for a missing, corrupt or foreign file); the prior buffers of a plugin-pretrained
    checkpoint are not restored (they are recomputed from the training data).
    """

    prior_extra_columns = 1

    @property
    def prior_loss_attrs(self) -> dict[str, bool]:
        return {"loss_fct": False} if self.train_stage == "finetune" else {}

    def _trains_item_softmax(self) -> bool:
        return self.train_stage == "finetune"

    def __init__(self, config, dataset):
        finetune = config["train_stage"] == "finetune"
        if finetune and config["ace_init"] is not None:
            raise PopPriorError("S3Rec cannot take ace_init in the finetune stage: its item table comes from the "
                                "pretrained checkpoint (give ace_init to the pretrain stage)")
        # RecBole's fine-tune __init__ loads pre_model_path with a bare torch.load, which would
        # unpickle code (and fails on torch >= 2.6): build the modules as for pretraining instead
        if finetune:
            config["train_stage"] = "pretrain"
        try:
            super().__init__(config, dataset)
        finally:
            if finetune:
                config["train_stage"] = "finetune"
        if not finetune:
            return
        self.train_stage = "finetune"
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        self._wrap_prior_losses()
        self._init_training_objective(config, dataset)
        state = checkpoint.load_checkpoint(self.pre_model_path or "<pre_model_path is empty>")
        own_prior = {k: v for k, v in self.state_dict().items() if k.split(".")[0] in PRIOR_STATE_KEYS}
        state["state_dict"] = {**{k: v for k, v in state["state_dict"].items()
                                  if k.split(".")[0] not in PRIOR_STATE_KEYS}, **own_prior}
        checkpoint.restore_model(self, state, self.pre_model_path)
        self.logger.info(f"Load pretrained model from {self.pre_model_path}")


class KSR(PriorSeparatedMixin, recbole_seq.KSR):
    """KSR's float64 relation matrix breaks its forward in RecBole 1.2.1: compat shim 7."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        compat.ksr_relation_float32(self)


class TransRec(PriorSeparatedMixin, recbole_seq.TransRec):
    """TransRec calls its BPR loss ``self.bpr_loss`` (not ``loss_fct``): that is the loss the
    pairwise prior wraps. Its regularisers (``emb_loss``, ``reg_loss``) are left alone."""

    prior_loss_attrs = {"bpr_loss": False}
