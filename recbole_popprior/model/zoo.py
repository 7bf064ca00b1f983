"""RecBole's sequential models in the registry: one :func:`register_model` call per model (docs/DESIGN.md §1.1).

Each call is the whole answer to "what does the plugin do with this model?": how its ``(H, E)``
are read (DESIGN §3), its training factors and auxiliary losses (DESIGN §6), whether the
factorised training path applies, its pairwise form (DESIGN §6.2), the tables ``ace_init`` sets
(DESIGN §7.3), its special subclass (:mod:`.special_cases`) and one line on how it takes the
prior. A field left out means the generic path: ``H = forward(item_seq, item_seq_len)``,
``E = item_embedding``, CE or BPR, the factorised path, ``ace_init`` on ``item_embedding``.
The records keep RecBole's classes and names; a user's model is registered the same way.
Which models take which loss and remedy: docs/DESIGN.md §7.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model import sequential_recommender as recbole_seq

from recbole_popprior.model import special_cases
from recbole_popprior.model.factors import TrainingFactors
from recbole_popprior.model.registry import GENERIC_NOTE, register_model


# --- reading the batch ------------------------------------------------------------------------
def _seq(m, i):
    return i[m.ITEM_SEQ]


def _len(m, i):
    return i[m.ITEM_SEQ_LEN]


def _user(m, i):
    return i[m.USER_ID]


def _gather_last(m, i, output):
    return m.gather_indexes(output, _len(m, i) - 1)


# --- (H, E) of the learned full-sort scores (DESIGN §3) -----------------------------------------
def _bert4rec_factors(m, i):
    item_seq = m.reconstruct_test_data(_seq(m, i), _len(m, i))
    H = _gather_last(m, i, m.forward(item_seq))
    H = torch.cat([H, H.new_ones(H.shape[0], 1)], dim=1)
    E = torch.cat([m.item_embedding.weight[: m.n_items], m.output_bias.unsqueeze(1)], dim=1)
    return H, E


def _core_factors(m, i):
    return m.forward(_seq(m, i)) / m.temperature, F.normalize(m.item_embedding.weight, dim=-1)


def _s3rec_factors(m, i):
    H = _gather_last(m, i, m.forward(_seq(m, i), bidirectional=False))
    return H, m.item_embedding.weight[: m.n_items - 1]


def _ksr_table(m):
    return m.dense_layer_i(torch.cat((m.item_embedding.weight, m.entity_embedding.weight), -1))


def _fpmc_factors(m, i):
    # FPMC's score is MF + FMC: <UI(u), IU(i)> + <LI(last item), IL(i)>, one dot product of
    # the concatenations [UI(u), LI(last)] and [IU(i), IL(i)]
    last = _seq(m, i).gather(1, (_len(m, i) - 1).unsqueeze(1)).squeeze(1)
    H = torch.cat([m.UI_emb(_user(m, i)), m.LI_emb(last)], dim=1)
    return H, torch.cat([m.IU_emb.weight, m.IL_emb.weight], dim=1)


# --- training batches whose rows, inputs or table differ from the full-sort factors (DESIGN §6) --
def _bert4rec_training(m, i) -> TrainingFactors:
    # RecBole's BERT4Rec scores the masked slots against E[:n_items] plus an output bias and
    # averages CE over the slots with masked_index > 0 (padding slots carry index 0)
    # (every slot is a row; the empty ones get weight 0 and look up item 1, so their term is finite)
    masked_index = i[m.MASK_INDEX]
    output = m.forward(i[m.MASK_ITEM_SEQ])  # [B L d]
    H = output.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, output.shape[-1])).reshape(-1, output.shape[-1])
    counts = (masked_index > 0).reshape(-1)
    H = torch.cat([H, H.new_ones(H.shape[0], 1)], dim=1)
    E = torch.cat([m.item_embedding.weight[: m.n_items], m.output_bias.unsqueeze(1)], dim=1)
    targets = i[m.POS_ITEMS].reshape(-1)
    return TrainingFactors(H, E, torch.where(counts, targets, torch.ones_like(targets)), counts.float())


def _core_training(m, i) -> TrainingFactors:
    # CORE drops out item-table entries before normalising, in training only (after forward,
    # so the dropout masks are drawn in RecBole's order)
    H = m.forward(_seq(m, i)) / m.temperature
    E = F.normalize(m.item_dropout(m.item_embedding.weight), dim=-1)
    return TrainingFactors(H, E, i[m.POS_ITEM_ID])


def _shan_training(m, i) -> TrainingFactors:
    # RecBole's SHAN trains on the inverted sequence but scores the plain one in full_sort_predict
    H = m.forward(i[m.INVERSE_ITEM_SEQ], _user(m, i))
    return TrainingFactors(H, m.item_embedding.weight, i[m.POS_ITEM_ID])


# --- the records, in RecBole's order of the README's list ---------------------------------------
_FEATURES = GENERIC_NOTE + " (item features only feed H)"
_CPR_PAIRWISE = "RecBole's softmax-CPR models train with loss_type CE only (BPR exits the process)"
_MIXTURE = "its scores are a mixture of softmaxes, not a dot product h.e"

register_model(recbole_seq.SASRec)
register_model(recbole_seq.SASRecF, note=_FEATURES)
register_model(recbole_seq.GRU4Rec)
register_model(recbole_seq.GRU4RecF, note=_FEATURES)
register_model(recbole_seq.NARM)
register_model(recbole_seq.STAMP)
register_model(
    recbole_seq.Caser, note=GENERIC_NOTE + "; forward(user, item_seq)",
    factors=lambda m, i: (m.forward(_user(m, i), _seq(m, i)), m.item_embedding.weight),
    auxiliary=lambda m, i, H: m.reg_weight * m.reg_loss(
        [m.user_embedding.weight, m.item_embedding.weight, m.conv_v.weight, m.fc1.weight, m.fc2.weight])
    + m.reg_loss_conv_h())
register_model(
    recbole_seq.NextItNet, note=GENERIC_NOTE + "; forward(item_seq)",
    factors=lambda m, i: (m.forward(_seq(m, i)), m.item_embedding.weight),
    auxiliary=lambda m, i, H: m.reg_weight * m.reg_loss([m.item_embedding.weight, m.final_layer.weight])
    + m.reg_loss_rb())
register_model(recbole_seq.SRGNN)
register_model(recbole_seq.GCSAN, auxiliary=lambda m, i, H: m.reg_weight * m.reg_loss(m.item_embedding.weight))
register_model(recbole_seq.FDSA, note=_FEATURES)
register_model(
    recbole_seq.FEARec,
    note=GENERIC_NOTE + "; its own contrastive temperature self.tau is RecBole's (the prior's weight is "
                        "prior_tau); no factorised training (its contrastive terms)",
    no_factorised_training="its loss adds contrastive terms on the sequence outputs, which the factorised "
                           "training path would drop")
register_model(recbole_seq.LightSANs)
register_model(
    recbole_seq.SHAN, note=GENERIC_NOTE + "; forward(item_seq, user)",
    factors=lambda m, i: (m.forward(_seq(m, i), _user(m, i)), m.item_embedding.weight),
    training=_shan_training,
    auxiliary=lambda m, i, H: m.reg_loss(m.user_embedding(_user(m, i)), m.item_embedding(i[m.POS_ITEM_ID])))
register_model(
    recbole_seq.FOSSIL, note=GENERIC_NOTE + "; forward(item_seq, item_seq_len, user)",
    factors=lambda m, i: (m.forward(_seq(m, i), _len(m, i), _user(m, i)), m.item_embedding.weight),
    auxiliary=lambda m, i, H: m.reg_loss(m.user_lambda(_user(m, i)), m.item_embedding(i[m.POS_ITEM_ID]), H))
register_model(
    recbole_seq.SINE, special_class=special_cases.SINE,
    note="generic in CE and BPR mode; NLL mode gets log-softmax outputs, so the prior is added in log space "
         "and renormalised (special_cases.SINE)",
    auxiliary=lambda m, i, H: m.calculate_reg_loss() * m.reg_loss_ratio if m.loss_type == "NLL" else 0.0)
register_model(
    recbole_seq.HRM, note=GENERIC_NOTE + "; forward(item_seq, user, item_seq_len)",
    factors=lambda m, i: (m.forward(_seq(m, i), _user(m, i), _len(m, i)), m.item_embedding.weight))
register_model(
    recbole_seq.BERT4Rec, special_class=special_cases.BERT4Rec, factors=_bert4rec_factors, training=_bert4rec_training,
    note="special: local CrossEntropyLoss and inline BPR in calculate_loss, output bias, mask-token row "
         "(special_cases.BERT4Rec)")
register_model(
    recbole_seq.S3Rec, special_class=special_cases.S3Rec, factors=_s3rec_factors,
    note="special: n_items+1 logits (mask token masked), prior in the fine-tune stage only, pretrained "
         "weights loaded safely (special_cases.S3Rec)")
register_model(
    recbole_seq.CORE, factors=_core_factors, training=_core_training,
    pairwise="none", no_pairwise="RecBole's CORE trains with loss_type CE only",
    note="generic: the hook sees cos(h, e) / temperature, so the prior is added OUTSIDE the temperature "
         "(the Bayes-optimal logit is PMI + log p(i), and the temperature only scales the learned "
         "similarity); H = normalised session / temperature, E = normalised table; CE only")
register_model(
    recbole_seq.HGN, note=GENERIC_NOTE + "; forward(item_seq, user), E = item_embedding_for_prediction",
    factors=lambda m, i: (m.forward(_seq(m, i), _user(m, i)), m.item_embedding_for_prediction.weight),
    auxiliary=lambda m, i, H: m.reg_loss(m.user_embedding(_user(m, i)), m.item_embedding_for_prediction(
        i[m.POS_ITEM_ID]), m.item_embedding(_seq(m, i))),
    ace_tables=("item_embedding", "item_embedding_for_prediction"))
register_model(
    recbole_seq.NPE, note=GENERIC_NOTE + "; forward(item_seq, user), E = relu(item_embedding)",
    factors=lambda m, i: (m.forward(_seq(m, i), _user(m, i)), torch.relu(m.item_embedding.weight)))
register_model(
    recbole_seq.GRU4RecCPR, special_class=special_cases.GRU4RecCPR, factors=None, no_factorised_training=_MIXTURE,
    pairwise="none", no_pairwise=_CPR_PAIRWISE,
    note="probability model: CE on log(prob + 1e-8); prior in log space, renormalised; serving renormalises "
         "in log space (special_cases._ProbabilityModel); no factors; CE only")
register_model(
    recbole_seq.SASRecCPR, special_class=special_cases.SASRecCPR, factors=None, no_factorised_training=_MIXTURE,
    pairwise="none", no_pairwise=_CPR_PAIRWISE,
    note="probability model: NLL on log(prob + 1e-8); prior in log space, renormalised; serving renormalises "
         "in log space (special_cases._ProbabilityModel); no factors; CE only")
register_model(
    recbole_seq.RepeatNet, special_class=special_cases.RepeatNet, factors=None,
    no_factorised_training="its scores mix a repeat and an explore distribution, not a dot product h.e",
    pairwise="none", no_pairwise="RecBole's RepeatNet trains its own NLL loss whatever loss_type says",
    ace_tables=("item_matrix",),
    note="probability model: F.nll_loss on log(prob + 1e-8); prior in log space, renormalised; serving "
         "renormalises in log space (special_cases._ProbabilityModel); no factors; trains on RecBole's "
         "sampled rows (its input type is pointwise), as RecBole's pipeline does")
register_model(recbole_seq.GRU4RecKG, note=GENERIC_NOTE + " (the KG entity table only feeds H)")
register_model(
    recbole_seq.KSR, special_class=special_cases.KSR,
    factors=lambda m, i: (m.forward(_seq(m, i), _len(m, i)), _ksr_table(m)),
    note=GENERIC_NOTE + "; E = dense_layer_i([item_embedding, entity_embedding]); float64 relation matrix "
                        "cast to float32 (RecBole bug, compat shim 7)")
register_model(
    recbole_seq.FPMC, factors=_fpmc_factors, pairwise="only",
    no_factorised_training="it trains a pairwise BPR loss only (RecBole's FPMC has no softmax over the items)",
    ace_tables="FPMC's items have three tables in different roles (MF and the two FMC factors); ACE gives one",
    note="BPR only: generic pairwise prior on loss_fct's two scores; H = [UI(user), LI(last item)], "
         "E = [IU, IL] (MF + FMC as one dot product)")
# RecBole's TransRec scores b_i - ||h - e_i|| (the distance, not its square: _l2_distance takes the
# square root), which no finite H E^T reproduces: the streaming fallback measures it
register_model(
    recbole_seq.TransRec, special_class=special_cases.TransRec, factors=None, pairwise="only",
    no_factorised_training="it trains a pairwise BPR loss only, and its score is a distance, not a dot product h.e",
    note="BPR only: the pairwise prior on self.bpr_loss's two scores (special_cases.TransRec); score "
         "b_i - ||h - e_i|| is a distance, no factors (the energies stream the scores)")
_CTR = "{} is a click-through-rate model (pointwise BCE on labels), not a ranking over the items"
register_model(recbole_seq.DIN, refused=_CTR.format("DIN"))
register_model(recbole_seq.DIEN, refused=_CTR.format("DIEN"))
