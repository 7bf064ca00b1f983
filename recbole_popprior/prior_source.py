"""Where the training prior comes from: ``prior_source: estimate | truth`` (docs/DESIGN.md §2, §12).

``estimate`` (the default) is the smoothed count of the training targets
(:func:`recbole_popprior.prior.estimate_log_prior`). ``truth`` is the generator's own item
marginal ``log p``, read from the truth file that :mod:`recbole_popprior.data.synthetic` writes
next to the atomic file (``<data_path>/<dataset>.truth.npz``): it exists for ``--dataset=synthetic``
only, and ``config._validate`` refuses the key elsewhere. It separates the part of a
prior-separated model's residual popularity that comes from estimating ``p`` (smoothing,
finite counts) from the part that does not.

A leaf module (numpy and torch only): the model mixin reads the true prior through it, and the
synthetic generator, which depends on the config, re-indexes its truth with :func:`raw_item_ids`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbole_popprior.errors import PopPriorError

#: the values of ``prior_source`` (default first)
PRIOR_SOURCES: tuple[str, ...] = ("estimate", "truth")


def truth_file(data_path: str | os.PathLike, dataset: str) -> Path:
    """``<data_path>/<dataset>.truth.npz``: where the synthetic generator keeps its truth."""
    return Path(data_path) / f"{dataset}.truth.npz"


def raw_item_ids(dataset: Any, item_field: str | None = None) -> np.ndarray:
    """``raw[internal]``: the raw integer token of every RecBole item id (0 for padding).

    The synthetic generator's items are the tokens ``1..n``; RecBole remaps them in order of
    first appearance, so every truth array must be re-indexed through this table.
    """
    item_field = item_field or dataset.iid_field
    raw = np.zeros(dataset.num(item_field), dtype=np.int64)
    for token, internal in dataset.field2token_id[item_field].items():
        if token != "[PAD]":
            raw[internal] = int(token)
    return raw


def true_log_prior(config: Any, dataset: Any) -> torch.Tensor:
    """The generator's ``log p(i)`` in RecBole's item ids, ``[n_items]`` float32, ``-inf`` at padding.

    Not renormalised over the items present in the data: a constant shift of the prior is a
    per-context constant of the logits, which the softmax ignores. Every item of the data set
    must be one of the generator's (a one-line error otherwise).
    """
    path = truth_file(config["data_path"], config["dataset"])
    if not path.is_file():
        raise PopPriorError(f"prior_source: truth needs the generator's truth file {path}; "
                            "only --dataset=synthetic writes one")
    try:
        with np.load(path, allow_pickle=False) as data:
            log_p = np.asarray(data["log_p"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise PopPriorError(f"prior_source: truth: cannot read log_p from {path}: {exc}") from None
    raw = raw_item_ids(dataset, config["ITEM_ID_FIELD"])
    real = raw[1:]
    if real.size and (real.min() < 1 or real.max() > log_p.shape[0]):
        raise PopPriorError(f"prior_source: truth: the data set has items that {path} does not describe")
    out = np.full(raw.shape[0], -np.inf)
    out[1:] = log_p[real - 1]
    if not np.all(np.isfinite(out[1:])):
        raise PopPriorError(f"prior_source: truth: {path} has non-finite log_p entries")
    return torch.from_numpy(out).to(torch.float32)


__all__ = ["PRIOR_SOURCES", "truth_file", "raw_item_ids", "true_log_prior"]
