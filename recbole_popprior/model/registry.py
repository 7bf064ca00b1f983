"""One record per model: everything the plugin does differently per model, found by class (docs/DESIGN.md §1.1).

A :class:`ModelRecord` says, for one model class, how its ``(H, E)`` factors are read, whether
the factorised training path applies (and why not), its training factors and auxiliary loss
terms, its pairwise form, the item tables ``ace_init`` sets, its special prior-separated
subclass, and one line on how it takes the prior. RecBole's own models are registered in
:mod:`~recbole_popprior.model.zoo`, one :func:`register_model` call each, exactly as a user
registers theirs.

A record is found by walking the model class's MRO (:func:`record_of`), so ``class
MySASRec(SASRec)`` gets SASRec's record, and so do the plugin's classes built on SASRec. The
registry holds no behaviour of its own: the consumers (the mixin, :mod:`.factors`, the config
checks) read the record's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from recbole_popprior.errors import PopPriorError

#: ``(model, interaction) -> (H [b, d], E [n_items, d])`` with ``H E^T`` the learned full-sort
#: scores, or ``None`` where the batch has no such factorisation
Factors = Callable[[Any, Any], "tuple[torch.Tensor, torch.Tensor] | None"]
#: ``(model, interaction) -> TrainingFactors`` of a training batch (:mod:`.factors`)
Training = Callable[[Any, Any], Any]
#: ``(model, interaction, H) ->`` the model's loss terms besides the item softmax
Auxiliary = Callable[[Any, Any, torch.Tensor], "torch.Tensor | float"]
#: ``optional``: CE or BPR (``loss_type``); ``only``: BPR whatever ``loss_type`` says; ``none``: CE only
Pairwise = Literal["optional", "only", "none"]
PAIRWISE_FORMS: tuple[str, ...] = ("optional", "only", "none")

GENERIC_NOTE = ("generic: [B, n_items] logits through self.loss_fct (BPR: its two scores get the pairwise "
                "prior), H = forward(...), E = item_embedding")


def generic_factors(model: Any, interaction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``H = forward(item_seq, item_seq_len)``, ``E = item_embedding.weight``: how most RecBole
    sequential models score (``None`` when the model does not fit that pattern)."""
    if getattr(model, "item_embedding", None) is None or not hasattr(model, "ITEM_SEQ"):
        return None
    H = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    E = model.item_embedding.weight
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[-1] != E.shape[-1]:
        return None
    return H, E


@dataclass(frozen=True, eq=False)
class ModelRecord:
    """What the plugin knows about one model class (see :func:`register_model` for the fields)."""

    model_class: type
    note: str = GENERIC_NOTE
    factors: Factors | None = generic_factors
    training: Training | None = None
    auxiliary: Auxiliary | None = None
    no_factorised_training: str | None = None
    pairwise: Pairwise = "optional"
    no_pairwise: str | None = None
    ace_tables: tuple[str, ...] | str = ("item_embedding",)
    special_class: type | None = None
    refused: str | None = None

    @property
    def name(self) -> str:
        """The model's name (RecBole's, for RecBole's models): ``--model`` takes it."""
        return self.model_class.__name__

    @property
    def supported(self) -> bool:
        return self.refused is None

    def factorised_training_refusal(self) -> str | None:
        """Why the factorised training path (DESIGN §6) does not apply, or ``None`` when it does."""
        if self.no_factorised_training is not None:
            return self.no_factorised_training
        if self.factors is None:
            return "its score is not a dot product h.e"
        return None


#: every registered model, by class, in registration order
_RECORDS: dict[type, ModelRecord] = {}


def register_model(model_class: type, *, note: str = GENERIC_NOTE, factors: Factors | None = generic_factors,
                   training: Training | None = None, auxiliary: Auxiliary | None = None,
                   no_factorised_training: str | None = None, pairwise: Pairwise = "optional",
                   no_pairwise: str | None = None, ace_tables: tuple[str, ...] | str = ("item_embedding",),
                   special_class: type | None = None, refused: str | None = None) -> ModelRecord:
    """Register ``model_class`` (a RecBole ``SequentialRecommender``) with the plugin; one call per model.

    - ``note``: one line on how the model takes the prior (the README's model table shows it).
    - ``factors``: how ``(H, E)`` are read (DESIGN §3); :func:`generic_factors` by default;
      ``None`` when the learned score is not a dot product (the energy metrics stream the scores).
    - ``training``: ``(H, E, targets)`` of a training batch when they differ from ``factors``
      (DESIGN §6); ``auxiliary``: the loss terms the model adds besides the item softmax.
    - ``no_factorised_training``: why sampled softmax and the remedies cannot train it.
    - ``pairwise``: ``optional`` (CE or BPR), ``only`` (BPR only) or ``none`` with the reason
      ``no_pairwise`` (DESIGN §6.2).
    - ``ace_tables``: the item tables ``ace_init`` sets, or why it cannot (DESIGN §7.3).
    - ``special_class``: a subclass of the mixin and ``model_class`` for a model the generic
      path does not fit (it takes ``model_class``'s name).
    - ``refused``: why the model cannot take a prior at all (it stays a record, with the reason).

    A subclass of a registered model needs no call: it gets its parent's record.
    """
    if not isinstance(model_class, type):
        raise PopPriorError(f"register_model needs a model class, got {model_class!r}")
    if model_class in _RECORDS:
        raise PopPriorError(f"{model_class.__name__} is registered already (unregister_model it first)")
    taken = find_record(model_class.__name__)
    if taken is not None:
        raise PopPriorError(f"another model is registered as {taken.name} ({taken.model_class.__module__})")
    if pairwise not in PAIRWISE_FORMS:
        raise PopPriorError(f"pairwise must be one of {', '.join(PAIRWISE_FORMS)}, got {pairwise!r}")
    if (pairwise == "none") != (no_pairwise is not None):
        raise PopPriorError("pairwise='none' takes the reason no_pairwise, and only it does")
    if not isinstance(ace_tables, str) and not (
            isinstance(ace_tables, tuple) and ace_tables and all(isinstance(t, str) for t in ace_tables)):
        raise PopPriorError(f"ace_tables must be a tuple of attribute names or a reason, got {ace_tables!r}")
    # the mixin imports this module, so "a subclass of the mixin" is checked by its method
    if special_class is not None and not (isinstance(special_class, type) and issubclass(special_class, model_class)
                                          and hasattr(special_class, "add_training_prior")):
        raise PopPriorError(f"special_class must be a subclass of PriorSeparatedMixin and {model_class.__name__}, "
                            f"got {special_class!r}")
    record = ModelRecord(model_class, note, factors, training, auxiliary, no_factorised_training, pairwise,
                         no_pairwise, ace_tables, special_class, refused)
    _RECORDS[model_class] = record
    return record


def unregister_model(model_class: type) -> None:
    """Remove ``model_class``'s own record (its subclasses fall back to their next registered parent)."""
    _RECORDS.pop(model_class, None)


def record_of(model: type | Any) -> ModelRecord | None:
    """The record of a model class (or instance): its own, or that of its nearest registered
    ancestor in the MRO; ``None`` when no class in the MRO is registered."""
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        record = _RECORDS.get(base)
        if record is not None:
            return record
    return None


def find_record(name: str) -> ModelRecord | None:
    """The record registered under ``name`` (any case), or ``None``."""
    lowered = name.lower()
    return next((r for r in _RECORDS.values() if r.name.lower() == lowered), None)


def records() -> list[ModelRecord]:
    """Every record, supported and refused, in registration order."""
    return list(_RECORDS.values())


def supported_models() -> list[str]:
    """Names accepted by ``--model`` (RecBole's own model names, then any the user registered)."""
    return [r.name for r in _RECORDS.values() if r.supported]


def require_record(model: type | Any) -> ModelRecord:
    """:func:`record_of`, or a one-line :class:`PopPriorError` for an unregistered or refused model."""
    cls = model if isinstance(model, type) else type(model)
    record = record_of(cls)
    if record is None:
        raise PopPriorError(f"{cls.__name__} is not a registered model: no class in its MRO has a record; "
                            "register it with recbole_popprior.register_model (README: adding your own model)")
    if record.refused is not None:
        raise PopPriorError(f"{record.name} cannot take a popularity prior: {record.refused}. "
                            f"Supported models: {', '.join(supported_models())}")
    return record


def recbole_model_name(config: Any) -> str:
    """The name RecBole's own name-based lookups (model yaml, dataset and trainer class) need for
    the configured model: that of its record, so ``MySASRec`` reads as SASRec (``config["model"]``
    for a config without a registered ``model_class``)."""
    cls = getattr(config, "model_class", None)
    record = record_of(cls) if isinstance(cls, type) else None
    return record.name if record is not None else config["model"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's table of supported and refused models, one row per record."""
    lines = ["| model | loss_type | sampled softmax, remedies | energy path | how it takes the prior |",
             "| --- | --- | --- | --- | --- |"]
    for r in _RECORDS.values():
        if r.refused is not None:
            lines.append(f"| {r.name} | refused | refused | - | {_cell(r.refused)} |")
            continue
        losses = {"optional": "CE, BPR", "only": "BPR only", "none": "CE only"}[r.pairwise]
        factorised = "yes" if r.factorised_training_refusal() is None else "no"
        energy = "streaming scores" if r.factors is None else "factorised H E^T"
        lines.append(f"| {r.name} | {losses} | {factorised} | {energy} | {_cell(r.note)} |")
    return "\n".join(lines)


__all__ = ["ModelRecord", "register_model", "unregister_model", "record_of", "find_record", "records",
           "supported_models", "require_record", "recbole_model_name", "generic_factors", "markdown_table",
           "GENERIC_NOTE", "PAIRWISE_FORMS"]
