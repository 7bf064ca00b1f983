"""The plugin's checkpoint format: a state dict plus plain JSON metadata (compat shim 3).

RecBole 1.2.1 pickles its ``Config`` into checkpoints, which torch >= 2.6 refuses to load with
``weights_only=True``; turning that off would run arbitrary pickled code from the file. A
checkpoint here holds only tensors, plain containers and one JSON string, so it always loads
with ``weights_only=True``. The metadata records a SHA-256 digest of every tensor and value
saved, checked on load: torch's zip reader checks no CRC, so a flipped byte inside a tensor
would otherwise load as a silently different model. The digest is mandatory: a file of this
format without one is refused (deleting it would otherwise let a modified file load), and the
file's structure (a state dict of tensors, plain metadata nested a few levels at most) is checked
before anything uses it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import re
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.utils import atomic_write

CHECKPOINT_FORMAT = "recbole-popprior-checkpoint/1"
#: the saved entries the digest covers (everything but the metadata that holds it)
_DIGESTED = ("state_dict", "optimizer", "other_parameter")
#: how deeply a checkpoint's containers may nest (an optimizer state is 4 levels; deeper is no
#: file the plugin wrote, and would only end in a RecursionError)
MAX_NESTING = 16


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


def _is_plain(value: Any) -> bool:
    """Tensors, numbers, strings and containers of them: what ``weights_only=True`` loads."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    return False


def _other_parameters(model: torch.nn.Module) -> dict[str, Any] | None:
    """RecBole's ``other_parameter()`` entries that a checkpoint can hold as plain data.

    SASRecF, GRU4RecF and FDSA list their ``feature_embed_layer`` there: a module whose weights
    are already in the state dict and whose other attributes (the dataset, its item features)
    are rebuilt from the data when the model is built, so modules are left out. Anything else
    that is not plain data would need pickled code to restore: refused with one line.
    """
    other = model.other_parameter() if hasattr(model, "other_parameter") else None
    if not isinstance(other, dict):
        return None
    kept = {}
    for name, value in other.items():
        if isinstance(value, torch.nn.Module):
            continue
        if not _is_plain(value):
            raise PopPriorError(f"cannot save {type(model).__name__}.{name} ({type(value).__name__}) in a "
                                "checkpoint: only tensors and plain values are saved, never pickled objects")
        kept[name] = value
    return kept or None


def payload_digest(state: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the saved tensors and values (``state_dict``, ``optimizer``,
    ``other_parameter``): names, dtypes, shapes and bytes, independent of dict order."""
    digest = hashlib.sha256()
    _feed(digest, [state.get(key) for key in _DIGESTED])
    return "sha256:" + digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(value, dict):
        digest.update(f"D{len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{value!r};".encode())


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, config: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, **meta: Any) -> Path:
    """Save ``model``'s state dict plus plain metadata, loadable with ``weights_only=True``.

    Replaces RecBole's ``Trainer._save_checkpoint`` (trainer.py ~L289), which pickles
    the ``Config`` object. Metadata is stored as a JSON string, so no code is pickled; it
    carries the content digest that :func:`load_checkpoint` checks.
    The file is written to a temporary name and renamed.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "other_parameter": _other_parameters(model),
    }
    state["meta"] = json.dumps({"config": _plain_config(config), **meta, "digest": payload_digest(state)},
                               default=str)
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


class PickledCheckpointError(PopPriorError):
    """The file is a pickle of Python objects (RecBole's own checkpoint format), not a plugin checkpoint."""


def _is_pickle_refusal(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or str(exc).startswith("Weights only load failed")


def _refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused the file, without torch's advice to turn
    ``weights_only`` off (which would run the pickled code this format exists to avoid)."""
    text = str(exc)
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
    if _is_pickle_refusal(exc):
        what = f"it names {found.group(1)}" if found else "objects that are not plain data"
        return (f"it holds pickled Python objects, not only tensors ({what[:120]}); refused, because "
                "loading them could run code")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"corrupt, truncated or not a recbole-popprior checkpoint ({first[:200]})"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Returns ``{"state_dict", "optimizer", "other_parameter", "meta"}``. A missing,
    truncated, corrupt, tampered or foreign file raises :class:`PopPriorError` with one line;
    no pickled code is ever executed. Corruption is caught twice: by the zip members' CRCs
    and by the content digest in the metadata, which every file must have.
    """
    path = Path(path)
    if not path.is_file():
        raise PopPriorError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
            if packed:  # torch.save stores, never compresses: a compressed member could unpack to any size
                raise PopPriorError(f"cannot load checkpoint {path}: its member {packed[0]} is compressed, which "
                                    "torch.save never does (not a recbole-popprior checkpoint)")
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopPriorError(f"cannot load checkpoint {path}: corrupt, truncated or not a "
                            f"recbole-popprior checkpoint ({reason[:200]})") from None
    if bad_member is not None:
        raise PopPriorError(f"cannot load checkpoint {path}: corrupt (member {bad_member} fails its CRC check)")
    try:
        with warnings.catch_warnings():  # torch's note on RecBole's pickle protocol 4, before it refuses the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except RecursionError:  # (RecursionError is a RuntimeError: before the general case)
        raise PopPriorError(f"cannot load checkpoint {path}: its containers nest too deeply") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError,
            zipfile.BadZipFile, pickle.UnpicklingError, MemoryError) as exc:
        error = PickledCheckpointError if _is_pickle_refusal(exc) else PopPriorError
        raise error(f"cannot load checkpoint {path}: {_refusal(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PopPriorError(f"cannot load checkpoint {path}: not a recbole-popprior checkpoint "
                            f"(expected format {CHECKPOINT_FORMAT})")
    problem = _structure_problem(state)
    if problem:
        raise PopPriorError(f"cannot load checkpoint {path}: {problem}")
    try:
        state["meta"] = json.loads(state.get("meta") or "{}")
    except RecursionError:
        raise PopPriorError(f"cannot load checkpoint {path}: its metadata nests too deeply") from None
    except (TypeError, ValueError):
        raise PopPriorError(f"cannot load checkpoint {path}: its metadata is not valid JSON") from None
    if not isinstance(state["meta"], dict):
        raise PopPriorError(f"cannot load checkpoint {path}: its metadata is not a JSON object")
    recorded = state["meta"].get("digest")
    if not isinstance(recorded, str):
        raise PopPriorError(f"cannot load checkpoint {path}: it records no content digest (every checkpoint "
                            "the plugin writes has one): modified, or not written by recbole-popprior")
    if recorded != payload_digest(state):
        raise PopPriorError(f"cannot load checkpoint {path}: corrupt or modified (its tensors do not match "
                            "the digest recorded when it was saved)")
    return state


def _structure_problem(state: dict[str, Any]) -> str | None:
    """What keeps ``state`` from being a checkpoint :func:`save_checkpoint` wrote, or ``None``."""
    state_dict, meta = state.get("state_dict"), state.get("meta")
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        return "its state dict is not a mapping of names to tensors"
    for key in ("optimizer", "other_parameter"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"its {key} entry is a {type(state[key]).__name__}, not a mapping"
    if meta is not None and not isinstance(meta, str):
        return "its metadata is not a JSON string"
    if _depth(state, MAX_NESTING) > MAX_NESTING:
        return f"its containers nest more than {MAX_NESTING} levels deep"
    return None


def _depth(value: Any, limit: int, level: int = 0) -> int:
    """How deeply ``value``'s dicts, lists and tuples nest (stops counting past ``limit``)."""
    if level > limit or not isinstance(value, (dict, list, tuple)):
        return level
    children = value.values() if isinstance(value, dict) else value
    return max((_depth(child, limit, level + 1) for child in children), default=level + 1)


def _shape(value: Any) -> str:
    return "x".join(map(str, value.shape)) if hasattr(value, "shape") else type(value).__name__


def _listed(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def mismatch(model: torch.nn.Module, state_dict: dict[str, Any]) -> str | None:
    """What keeps ``state_dict`` from loading into ``model``: missing, unexpected and mis-shaped
    keys, briefly (``None`` when they match)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shaped = [f"{k} {_shape(state_dict[k])} (model {_shape(own[k])})" for k in own
              if k in state_dict and getattr(state_dict[k], "shape", None) != getattr(own[k], "shape", None)]
    parts = [f"{label} {_listed(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape differs for", shaped)) if keys]
    return "; ".join(parts) or None


def restore_model(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike = "?") -> None:
    """Load a checkpoint's weights into ``model`` with a one-line error on mismatch."""
    state_dict = state.get("state_dict")
    if not isinstance(state_dict, dict):
        raise PopPriorError(f"checkpoint {path} holds no state dict")
    problem = mismatch(model, state_dict)
    if problem:
        raise PopPriorError(f"checkpoint {path} does not match this {type(model).__name__}: {problem}")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().replace("\n", " ").replace("\t", "")
        raise PopPriorError(f"checkpoint {path} does not match this model: {first[:300]}") from None
    if state.get("other_parameter") and hasattr(model, "load_other_parameter"):
        model.load_other_parameter(state["other_parameter"])


# --------------------------------------------------------------------------------------
# RecBole's own (pickled) checkpoints, only when the user trusts the file
# --------------------------------------------------------------------------------------
class PickledPlaceholder:
    """Stands in for an object of another program (RecBole's ``Config``, its enums, a yaml
    loader) in a pickled checkpoint: it keeps the pickled state and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


_NUMPY_SCALAR = np.float64(0.0).__reduce__()[0]  # numpy's scalar rebuilder, in numpy 1 and 2 alike
#: what a RecBole checkpoint's pickle may build for real: torch's own tensor rebuilding, and numpy
#: scalars (its best validation score), which are rebuilt from a dtype and raw bytes
_REAL_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "device"): torch.device,
                 ("torch", "Size"): torch.Size, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                 ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
                 ("numpy", "dtype"): np.dtype, ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
                 ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR}
#: packages whose objects are replaced by a :class:`PickledPlaceholder` (RecBole's Config refers to yaml)
_PLACEHOLDER_PACKAGES = ("recbole", "yaml")


class _RestrictedUnpickler(pickle.Unpickler):
    """The pickle documentation's "restricting globals": every global the file names is refused,
    but torch's tensor rebuilding (real) and RecBole's objects (inert placeholders). So no
    function or class of the file's choosing ever runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL_GLOBALS:
            return _REAL_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)
        if module == "numpy.dtypes" and name.endswith("DType") and isinstance(getattr(np.dtypes, name, None), type):
            return getattr(np.dtypes, name)
        if module.split(".")[0] in _PLACEHOLDER_PACKAGES:
            return type(name, (PickledPlaceholder,), {"__module__": f"placeholder:{module}"})
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a RecBole checkpoint does not hold")


_RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, __name__="restricted_pickle")


def load_recbole_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load RecBole 1.2.1's own checkpoint (a pickle: ``config``, ``state_dict``, ``other_parameter``,
    ...) in the shape of :func:`load_checkpoint`, for ``--trust-pickled-checkpoint``.

    RecBole pickles its ``Config`` with protocol 4, which torch's ``weights_only`` reader cannot
    read at all, so the file is read with :class:`_RestrictedUnpickler` instead: tensors are
    rebuilt, RecBole's objects become inert placeholders, anything else is refused. The
    settings come from the placeholder of RecBole's ``Config`` (its ``final_config_dict``).
    There is no digest: a modified file loads as a different model.
    """
    path = Path(path)
    if not path.is_file():
        raise PopPriorError(f"checkpoint not found: {path}")
    try:
        # weights_only=False only because torch refuses a pickle_module otherwise: this
        # pickle_module is the restricted unpickler above, which builds tensors and placeholders only
        state = torch.load(path, map_location=map_location, pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except pickle.UnpicklingError as exc:
        raise PopPriorError(f"cannot load checkpoint {path} as RecBole's format: {exc}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopPriorError(f"cannot load checkpoint {path}: corrupt or not RecBole's format ({first[:200]})") from None
    config = state.get("config") if isinstance(state, dict) else None
    settings = getattr(config, "state", None)
    if not isinstance(state.get("state_dict") if isinstance(state, dict) else None, dict) \
            or not isinstance(settings, dict) or not isinstance(settings.get("final_config_dict"), dict):
        raise PopPriorError(f"cannot load checkpoint {path}: not RecBole's checkpoint format "
                            "(expected its config, state_dict and other_parameter)")
    meta = {key: state.get(key) for key in ("epoch", "cur_step", "best_valid_score")}
    meta.update(config=_plain_config(settings["final_config_dict"]), source="recbole")
    other = state.get("other_parameter")
    return {"format": "recbole", "state_dict": state["state_dict"], "optimizer": None, "meta": meta,
            "other_parameter": {k: v for k, v in other.items() if _is_plain(v)} if isinstance(other, dict) else None}


def load_trained_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                            trust_pickle: bool = False) -> dict[str, Any]:
    """A plugin checkpoint (:func:`load_checkpoint`); RecBole's pickled one only with ``trust_pickle``
    (``--trust-pickled-checkpoint``), else one line saying why it is refused."""
    try:
        return load_checkpoint(path, map_location)
    except PickledCheckpointError:
        if not trust_pickle:
            raise PopPriorError(f"checkpoint {path} is a pickle of Python objects (RecBole's own format), not a "
                                "recbole-popprior checkpoint: refused, because unpickling can run code from the "
                                "file; if you trust it, add --trust-pickled-checkpoint") from None
    return load_recbole_checkpoint(path, map_location)
