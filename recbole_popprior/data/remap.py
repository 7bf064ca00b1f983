"""RecBole's token -> id remapping, computed on integer codes (DESIGN.md §5.1).

``Dataset._remap`` concatenates a field's token columns (the ``.inter`` column first, then the
``.user`` / ``.item`` column for user / item ids) and calls ``pandas.factorize``: ids ``1, 2, ...``
follow the order in which tokens first appear, ``0`` is ``[PAD]`` (and missing cells). Here the
order comes from the first row of each code (``np.minimum.at``), so no string is touched per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

_CHUNK = 1 << 22


@dataclass
class Remap:
    """One field's remapping: ``id_of_code[c]`` is the id of code ``c`` (``id_of_code[-1] == 0``)
    and ``id_token`` / ``token_id`` are RecBole's ``field2id_token`` / ``field2token_id``."""

    id_of_code: np.ndarray
    id_token: np.ndarray
    token_id: dict

    def ids(self, codes: np.ndarray) -> np.ndarray:
        """Ids of per-row codes (``-1``, a missing cell, becomes ``0``); int32 when they fit."""
        return self.id_of_code[codes]


def first_appearance(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """The distinct codes ``>= 0`` of ``codes``, in the order of their first row."""
    never = np.iinfo(np.int64).max
    first = np.full(n_codes, never, dtype=np.int64)
    for start in range(0, len(codes), _CHUNK):  # chunks keep the row numbers' array small
        chunk = codes[start:start + _CHUNK]
        real = chunk >= 0
        np.minimum.at(first, chunk[real], np.arange(start, start + len(chunk))[real])
    seen = np.flatnonzero(first != never)
    return seen[np.argsort(first[seen], kind="stable")]


def remap(codes: np.ndarray, vocab: np.ndarray, feat_tokens: np.ndarray | None = None) -> tuple[Remap, np.ndarray | None]:
    """``pandas.factorize`` over ``[vocab[codes], feat_tokens]`` plus ``[PAD]``, as RecBole's ``_remap``.

    Returns the remapping and the ids of ``feat_tokens`` (the ``.user`` / ``.item`` id column;
    tokens no row has get the next ids, in table order).
    """
    order = first_appearance(codes, len(vocab))
    dtype = np.int32 if len(vocab) + (0 if feat_tokens is None else len(feat_tokens)) < 2**31 - 1 else np.int64
    # one extra slot at the end: code -1 (missing) indexes it and reads id 0
    id_of_code = np.zeros(len(vocab) + 1, dtype=dtype)
    id_of_code[order] = np.arange(1, len(order) + 1, dtype=dtype)
    tokens = ["[PAD]"] + vocab[order].tolist()
    feat_ids = None
    if feat_tokens is not None:
        feat_ids = np.zeros(len(feat_tokens), dtype=np.int64)
        feat_codes = pd.Index(vocab).get_indexer(feat_tokens) if len(vocab) else np.full(len(feat_tokens), -1)
        new: dict = {}
        for row, (token, code) in enumerate(zip(feat_tokens.tolist(), feat_codes.tolist())):
            if isinstance(token, float):  # NaN: pandas.factorize gives it no id
                continue
            if code >= 0 and id_of_code[code] > 0:
                feat_ids[row] = id_of_code[code]
            else:
                feat_ids[row] = new.setdefault(token, len(tokens) + len(new))
        tokens += list(new)
    id_token = np.array(tokens)  # RecBole keeps a numpy str array
    return Remap(id_of_code, id_token, {t: i for i, t in enumerate(tokens)}), feat_ids
