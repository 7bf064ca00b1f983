"""Every way a RecBole sequential model differs from the generic path, and why, in one place.

The generic path (:class:`~recbole_popprior.model.mixin.PriorSeparatedMixin`) wraps
``self.loss_fct``; that covers every model that builds ``[B, n_items]`` logits and calls it,
and serving adds ``beta * log p_hat`` to ``full_sort_predict``/``predict`` (DESIGN.md §1).

- :data:`UNSUPPORTED`: models that cannot take a softmax prior, with the reason.
- :data:`MODEL_NOTES`: how each supported model is handled (generic or special), one line each.
- :data:`SPECIAL_MIXINS`: the extra mixin per model, placed between the generic mixin and
  RecBole's class.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recbole_popprior import checkpoint, compat
from recbole_popprior.prior import WindowedPrior

#: RecBole sequential models that cannot take a softmax prior, with the reason.
UNSUPPORTED: dict[str, str] = {
    "FPMC": "FPMC is trained with a BPR loss only, so there is no softmax to add a prior to",
    "TransRec": "TransRec is trained with a BPR loss only, so there is no softmax to add a prior to",
    "DIN": "DIN is a click-through-rate model (pointwise BCE on labels), not a softmax over items",
    "DIEN": "DIEN is a click-through-rate model (pointwise BCE on labels), not a softmax over items",
}

_GENERIC = "generic: [B, n_items] logits through self.loss_fct, H = forward(...), E = item_embedding"

#: how every supported model takes the prior; one line each (the "why" of each special case).
MODEL_NOTES: dict[str, str] = {
    "SASRec": _GENERIC,
    "SASRecF": _GENERIC + " (item features only feed H)",
    "GRU4Rec": _GENERIC,
    "GRU4RecF": _GENERIC + " (item features only feed H)",
    "GRU4RecKG": _GENERIC + " (the KG entity table only feeds H)",
    "NARM": _GENERIC,
    "STAMP": _GENERIC,
    "Caser": _GENERIC + "; forward(user, item_seq)",
    "NextItNet": _GENERIC + "; forward(item_seq)",
    "SRGNN": _GENERIC,
    "GCSAN": _GENERIC,
    "FDSA": _GENERIC + " (item features only feed H)",
    "FEARec": _GENERIC + "; FEARec's contrastive temperature is also called self.tau "
                         "(kept for its own code, see _FEARec)",
    "LightSANs": _GENERIC,
    "SHAN": _GENERIC + "; forward(item_seq, user)",
    "FOSSIL": _GENERIC + "; forward(item_seq, item_seq_len, user)",
    "SINE": "generic in CE mode; NLL mode gets log-softmax outputs, so the prior is added in log "
            "space and renormalised; its interest temperature is also self.tau (see _SINE)",
    "HRM": _GENERIC + "; forward(item_seq, user, item_seq_len)",
    "BERT4Rec": "special: local CrossEntropyLoss in calculate_loss, output bias, mask-token row "
                "(see _BERT4Rec)",
    "S3Rec": "special: n_items+1 logits (mask token masked), prior in the fine-tune stage only, "
             "pretrained weights loaded safely (see _S3Rec)",
    "CORE": "generic: the hook sees logits / temperature, so the prior is added OUTSIDE the "
            "temperature (see _CORE_DECISION); H = normalised session / temperature, E = normalised table",
    "HGN": _GENERIC + "; forward(item_seq, user), E = item_embedding_for_prediction",
    "NPE": _GENERIC + "; forward(item_seq, user), E = relu(item_embedding)",
    "KSR": _GENERIC + "; E = dense_layer_i([item_embedding, entity_embedding]); float64 "
                      "relation matrix cast to float32 (RecBole bug, see _KSR)",
    "GRU4RecCPR": "probability model: CE on log(prob + 1e-8); prior in log space, renormalised; "
                  "serving renormalises in log space (see _ProbabilityModel); no factors",
    "SASRecCPR": "probability model: NLL on log(prob + 1e-8); prior in log space, renormalised; "
                 "serving renormalises in log space (see _ProbabilityModel); no factors",
    "RepeatNet": "probability model: F.nll_loss on log(prob + 1e-8); prior in log space, "
                 "renormalised; serving renormalises in log space (see _ProbabilityModel); no factors",
}

#: CORE: where the prior goes relative to the temperature (documented decision, no code needed).
_CORE_DECISION = """CORE's logits are cos(h_c, e_i) / temperature. The generic hook receives
exactly these logits, so the prior goes OUTSIDE the temperature:

    logits[c, i] = cos(h_c, e_i) / temperature + tau * log p_hat(i)

Reason: the Bayes-optimal logit is log p(i|c) = PMI(c, i) + log p(i) + a_c (DESIGN §1);
the temperature is part of the learned similarity (it scales the PMI part only), so the
prior must enter with its own weight tau, not tau / temperature. Serving adds
beta * log p_hat to the same scaled scores."""


@contextlib.contextmanager
def _own_tau(model: Any):
    """Inside this block ``model.tau`` is the RecBole model's own temperature."""
    model._recbole_tau_scope += 1
    try:
        yield
    finally:
        model._recbole_tau_scope -= 1


class _FEARec:
    """FEARec stores its contrastive temperature as ``self.tau`` and reads it inside
    ``calculate_loss``; the prior's weight keeps the public name ``model.tau``, so RecBole's
    code sees its own value while it runs (the prior hook reads the weight directly)."""

    def calculate_loss(self, interaction):
        with _own_tau(self):
            return super().calculate_loss(interaction)


class _SINE:
    """SINE stores its interest-aggregation temperature as ``self.tau`` and reads it in
    ``forward``. With ``loss_type: NLL`` it passes ``log_softmax`` outputs to ``NLLLoss``,
    so the prior is added in log space and renormalised (``log_softmax`` again), which
    equals CE over ``logits + tau log p_hat``."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.prior_loss_attrs = {"loss_fct": self.loss_type == "NLL"}

    def forward(self, item_seq, item_seq_len):
        with _own_tau(self):
            return super().forward(item_seq, item_seq_len)


class _ProbabilityModel:
    """GRU4RecCPR, SASRecCPR and RepeatNet output probabilities ``p(i|c)`` and pass
    ``log(p + 1e-8)`` to their loss (CE, NLLLoss or ``F.nll_loss``). Training adds
    ``tau log p_hat`` in log space and renormalises with ``log_softmax``. Serving keeps
    probabilities: ``softmax(log p(i|c) + beta log p_hat(i))``, a monotone transform of the
    log-space score ``log p + beta log p_hat`` (``p * p_hat^beta`` for pointwise
    ``predict``). The learned scores for the energy metrics are ``log(p + 1e-8)``; there is
    no ``H E^T`` factorisation (mixtures of softmaxes)."""

    prior_loss_attrs = {"loss_fct": True}
    prior_scores_are_probabilities = True


class _BERT4Rec:
    """BERT4Rec builds a local ``nn.CrossEntropyLoss`` inside ``calculate_loss`` (the
    ``loss_fct`` hook never sees it), adds an item ``output_bias`` and has an n_items+1 table
    (the last row is the mask token, which is never a target and is dropped from the logits).

    Training (CE) is re-expressed here with RecBole's own pieces: ``logits = H E[:n]^T +
    output_bias + tau log p_hat``, CE over the masked positions (``masked_index > 0``, as
    RecBole counts them). Windowed priors: each masked target uses the window of its OWN
    interaction time (``timestamp_list`` at the masked position), falling back to the
    window of the sequence's target time when the time list is not loaded. BPR is left
    to RecBole (no softmax). Factors: ``H' = [H, 1]``, ``E' = [E[:n], output_bias]``.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._list_suffix = config["LIST_SUFFIX"]

    def calculate_loss(self, interaction):
        if self.loss_type != "CE":
            return super().calculate_loss(interaction)
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
        keep = (masked_index > 0).reshape(-1)
        return F.cross_entropy(logits[keep], pos_items.reshape(-1)[keep], reduction="sum") / keep.sum()

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


class _S3Rec:
    """S3Rec's table has n_items+1 rows (mask token last) and its fine-tune logits span all of
    them, so the training prior covers ``n_items + 1`` columns with the mask column at
    ``-inf`` (it is never a target). The pretrain stage has no item softmax: no prior there
    (its BCE losses are left alone). RecBole's fine-tune ``__init__`` loads
    ``pre_model_path`` with a bare ``torch.load``; here the checkpoint is read with
    :func:`recbole_popprior.checkpoint.load_checkpoint` (``weights_only=True``, one-line error
    for a missing, corrupt or foreign file), and the prior buffers of a plugin-pretrained
    checkpoint are not restored (they are recomputed from the training data).
    """

    prior_extra_columns = 1

    def __init__(self, config, dataset):
        finetune = config["train_stage"] == "finetune"
        if finetune:  # let RecBole build the modules without its own torch.load
            config["train_stage"] = "pretrain"
        try:
            super().__init__(config, dataset)
        finally:
            if finetune:
                config["train_stage"] = "finetune"
        if not finetune:
            self.prior_loss_attrs = {}
            return
        from recbole.model.loss import BPRLoss

        self.train_stage = "finetune"
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        state = checkpoint.load_checkpoint(self.pre_model_path or "<pre_model_path is empty>")
        state["state_dict"] = {k: v for k, v in state["state_dict"].items()
                               if k.split(".")[0] not in _PRIOR_STATE_KEYS}
        checkpoint.restore_model(self, state, self.pre_model_path)
        self.logger.info(f"Load pretrained model from {self.pre_model_path}")


class _KSR:
    """KSR's float64 relation matrix breaks its forward in RecBole 1.2.1: compat shim 7."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        compat.ksr_relation_float32(self)


#: state-dict entries owned by the plugin (not RecBole's model)
_PRIOR_STATE_KEYS = frozenset({"log_prior", "log_prior_windows", "prior_window_edges", "prior_tau_param"})

#: extra mixins per model name, placed between the generic mixin and RecBole's class.
SPECIAL_MIXINS: dict[str, type] = {
    "BERT4Rec": _BERT4Rec,
    "S3Rec": _S3Rec,
    "FEARec": _FEARec,
    "SINE": _SINE,
    "KSR": _KSR,
    "GRU4RecCPR": _ProbabilityModel,
    "SASRecCPR": _ProbabilityModel,
    "RepeatNet": _ProbabilityModel,
}
