"""Prior-separated versions of RecBole's sequential models, under RecBole's own names.

``get_model("SASRec")`` returns ``type("SASRec", (PriorSeparatedMixin, SASRec), {})``; the
models that differ are plain subclasses in :mod:`~recbole_popprior.model.special_cases`. Every
class keeps its model's name, so RecBole's name-based lookups (model yaml, trainer choice) keep
working. What the plugin does with each model is its record in the registry
(:mod:`~recbole_popprior.model.registry`; RecBole's models are registered by importing
:mod:`~recbole_popprior.model.zoo`, below), found by class: ``get_model`` also takes a class,
such as a user's ``class MySASRec(SASRec)``, which gets SASRec's record.
"""

from __future__ import annotations

import functools

from recbole.utils import InputType

from recbole_popprior import compat
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import zoo  # noqa: F401  (registers RecBole's models)
from recbole_popprior.model.mixin import PriorLoss, PriorSeparatedMixin, check_loss_type, prior_term
from recbole_popprior.model.pairwise import PairwisePriorLoss
from recbole_popprior.model.registry import (ModelRecord, find_record, record_of, records, register_model,
                                             require_record, supported_models, unregister_model)


def trains_without_negatives(model_class: type, loss_type: str | None) -> bool:
    """Whether RecBole's training data for this model must carry no sampled negatives (DESIGN §6.2).

    A softmax over the items (``loss_type`` CE or NLL) needs none, and RecBole refuses them for
    it (configurator.py ~L345). BPR models need their negative; RepeatNet (a pointwise model,
    whatever ``loss_type`` says) trains on RecBole's sampled rows in RecBole's own pipeline.
    """
    return loss_type in ("CE", "NLL") and getattr(model_class, "input_type", None) != InputType.POINTWISE


def _record_named(name: str) -> ModelRecord:
    record = find_record(name)
    if record is None:
        raise PopPriorError(f"unknown or unsupported model {name!r}; supported models: "
                            f"{', '.join(supported_models())}")
    require_record(record.model_class)  # a refused model: one line with the reason
    return record


def check_supported(name: str) -> str:
    """Return the registered spelling of ``name`` (RecBole's, for its models) or raise a one-line
    :class:`PopPriorError`."""
    return _record_named(name).name


def get_model(model: str | type, baseline: bool = False) -> type:
    """The prior-separated class for ``model`` (RecBole's own class if ``baseline``).

    ``model`` is a registered name (``"SASRec"``, any case) or a class: a registered model, a
    subclass of one (``class MySASRec(SASRec)`` gets SASRec's record) or a prior-separated class
    (returned as it is; ``baseline`` then gives the model class under it). The same class object
    is returned for every spelling of the call (one class per model).
    """
    if isinstance(model, str):
        model_class = _record_named(model).model_class
    elif isinstance(model, type):
        model_class = next(c for c in model.__mro__ if not issubclass(c, PriorSeparatedMixin))
        require_record(model_class)
        if not baseline and issubclass(model, PriorSeparatedMixin):
            return model
    else:
        raise PopPriorError(f"model must be a model name or class, got {model!r}")
    result = model_class if baseline else _prior_separated(model_class, record_of(model_class))
    compat.disable_anomaly_detection()  # importing RecBole's models switches it on (compat shim 6)
    return result


@functools.lru_cache(maxsize=None)
def _prior_separated(model_class: type, record: ModelRecord) -> type:
    # keyed by the record too, so a model registered again gets a class of its new record
    special = record.special_class
    if special is not None and model_class is record.model_class:
        return special
    # a subclass of a special model takes the special class's overrides over its own network
    return type(model_class.__name__, (special or PriorSeparatedMixin, model_class),
                {"__module__": __name__, "__doc__": f"Prior-separated {model_class.__name__} (docs/DESIGN.md §1)."})


__all__ = ["get_model", "supported_models", "check_supported", "PriorSeparatedMixin", "PriorLoss",
           "PairwisePriorLoss", "prior_term", "trains_without_negatives", "check_loss_type", "ModelRecord",
           "register_model", "unregister_model", "record_of", "records", "require_record"]
