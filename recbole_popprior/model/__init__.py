"""Prior-separated versions of RecBole's sequential models, under RecBole's own names.

``get_model("SASRec")`` returns ``type("SASRec", (PriorSeparatedMixin, SASRec), {})``; the
models that differ are plain subclasses in :mod:`~recbole_popprior.model.special_cases`. Every
class keeps RecBole's name, so RecBole's name-based lookups (model yaml, trainer choice) keep
working.
"""

from __future__ import annotations

import functools

from recbole.utils import InputType
from recbole.utils import get_model as recbole_get_model

from recbole_popprior import compat
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.mixin import PriorLoss, PriorSeparatedMixin, check_loss_type, prior_term
from recbole_popprior.model.pairwise import NO_PAIRWISE, PAIRWISE_ONLY, PairwisePriorLoss
from recbole_popprior.model.special_cases import MODEL_NOTES, SPECIAL_CLASSES, UNSUPPORTED

#: every RecBole 1.2.1 sequential model the plugin supports: the 27 that train a softmax over
#: the items (loss_type CE or NLL; most also take BPR) and the two BPR-only ones (FPMC, TransRec)
SUPPORTED_MODELS: tuple[str, ...] = (
    "SASRec", "SASRecF", "GRU4Rec", "GRU4RecF", "NARM", "STAMP", "Caser", "NextItNet",
    "SRGNN", "GCSAN", "FDSA", "FEARec", "LightSANs", "SHAN", "FOSSIL", "SINE", "HRM",
    "BERT4Rec", "S3Rec", "CORE", "HGN", "NPE", "GRU4RecCPR", "SASRecCPR", "RepeatNet",
    "GRU4RecKG", "KSR", "FPMC", "TransRec",
)


def trains_without_negatives(model_class: type, loss_type: str | None) -> bool:
    """Whether RecBole's training data for this model must carry no sampled negatives (DESIGN §6.2).

    A softmax over the items (``loss_type`` CE or NLL) needs none, and RecBole refuses them for
    it (configurator.py ~L345). BPR models need their negative; RepeatNet (a pointwise model,
    whatever ``loss_type`` says) trains on RecBole's sampled rows in RecBole's own pipeline.
    """
    return loss_type in ("CE", "NLL") and getattr(model_class, "input_type", None) != InputType.POINTWISE


def supported_models() -> list[str]:
    """Names accepted by ``--model`` (RecBole's own model names)."""
    return list(SUPPORTED_MODELS)


def _canonical(name: str) -> str:
    for known in (*SUPPORTED_MODELS, *UNSUPPORTED):
        if known.lower() == name.lower():
            return known
    return name


def check_supported(name: str) -> str:
    """Return RecBole's spelling of ``name`` or raise a one-line :class:`PopPriorError`."""
    name = _canonical(name)
    if name in UNSUPPORTED:
        raise PopPriorError(f"{name} cannot take a popularity prior: {UNSUPPORTED[name]}. "
                            f"Supported models: {', '.join(SUPPORTED_MODELS)}")
    if name not in SUPPORTED_MODELS:
        raise PopPriorError(f"unknown or unsupported model {name!r}; supported models: "
                            f"{', '.join(SUPPORTED_MODELS)}")
    return name


def get_model(name: str, baseline: bool = False) -> type:
    """The prior-separated class for RecBole model ``name`` (RecBole's own class if ``baseline``).

    The same class object is returned for every spelling of the call (one class per model).
    """
    name = check_supported(name)
    model_class = recbole_get_model(name) if baseline else _prior_separated(name)
    compat.disable_anomaly_detection()  # importing RecBole's models switches it on (compat shim 6)
    return model_class


@functools.lru_cache(maxsize=None)
def _prior_separated(name: str) -> type:
    if name in SPECIAL_CLASSES:
        return SPECIAL_CLASSES[name]
    return type(name, (PriorSeparatedMixin, recbole_get_model(name)),
                {"__module__": __name__, "__doc__": f"Prior-separated {name} (docs/DESIGN.md §1)."})


__all__ = ["get_model", "supported_models", "check_supported", "PriorSeparatedMixin", "PriorLoss",
           "PairwisePriorLoss", "prior_term", "trains_without_negatives", "SUPPORTED_MODELS", "MODEL_NOTES",
           "SPECIAL_CLASSES", "UNSUPPORTED", "PAIRWISE_ONLY", "NO_PAIRWISE", "check_loss_type"]
