"""The plugin's checkpoint format: a state dict plus plain JSON metadata (compat shim 3).

RecBole 1.2.1 pickles its ``Config`` into checkpoints, which torch >= 2.6 refuses to load with
``weights_only=True``; turning that off would run arbitrary pickled code from the file. A
checkpoint here holds only tensors, plain containers and one JSON string, so it always loads
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.utils import atomic_write

CHECKPOINT_FORMAT = "recbole-popprior-checkpoint/1"


def _plain_config(config: Any) -> dict[str, Any]:
    """The JSON-representable part of a RecBole ``Config`` (for the checkpoint's metadata)."""
    source = getattr(config, "final_config_dict", config) or {}
    plain: dict[str, Any] = {}
    for key, value in source.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        plain[key] = value
    return plain


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, config: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, **meta: Any) -> Path:
    """Save ``model``'s state dict plus plain metadata, loadable with ``weights_only=True``.

    Replaces RecBole's ``Trainer._save_checkpoint`` (trainer.py ~L289), which pickles
    the ``Config`` object. Metadata is stored as a JSON string, so no code is pickled.
    The file is written to a temporary name and renamed.
    """
    other = model.other_parameter() if hasattr(model, "other_parameter") else None
    state = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "other_parameter": other if isinstance(other, dict) and other else None,
        "meta": json.dumps({"config": _plain_config(config), **meta}, default=str),
    }
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Returns ``{"state_dict", "optimizer", "other_parameter", "meta"}``. A missing,
    truncated, tampered or foreign file raises :class:`PopPriorError` with one line;
    no pickled code is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise PopPriorError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError,
            zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopPriorError(f"cannot load checkpoint {path}: corrupt, truncated or not a "
                            f"recbole-popprior checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PopPriorError(f"cannot load checkpoint {path}: not a recbole-popprior checkpoint "
                            f"(expected format {CHECKPOINT_FORMAT})")
    try:
        state["meta"] = json.loads(state.get("meta") or "{}")
    except (TypeError, ValueError):
        raise PopPriorError(f"cannot load checkpoint {path}: its metadata is not valid JSON") from None
    return state


def restore_model(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike = "?") -> None:
    """Load a checkpoint's weights into ``model`` with a one-line error on mismatch."""
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise PopPriorError(f"checkpoint {path} does not match this model: {first[:200]}") from None
    if state.get("other_parameter") and hasattr(model, "load_other_parameter"):
        model.load_other_parameter(state["other_parameter"])
