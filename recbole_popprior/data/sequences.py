"""Lean sequential data: O(N) storage, each batch's item lists built when it is indexed (DESIGN.md §5.2).

RecBole's ``SequentialDataset.data_augmentation`` turns every interaction after a user's first
into a training example ``(user, item_list, item_length) -> item`` and stores
``[N, MAX_ITEM_LIST_LENGTH]`` tensors for every loaded field. Here only the interactions are
stored, user after user in time order (:class:`SequenceStore`); a split is an array of target
positions (:class:`SequenceView`); and ``view[index]`` builds the batch's lists with one
``[B, L]`` gather. The positions and their order are RecBole's, so the batches are too:

- example ``p`` (the interaction at flat position ``p``) has the list
  ``items[max(start_u, p - L) : p]``, left-aligned and zero-padded, and ``item_length`` its size;
- ``build()`` sorts the examples by target time (stable, float32 as RecBole stores it), then
  ``leave_one_out`` groups them by user in order of first appearance: a user's group starts at
  its first example ``start_u + 1``, and inside a group the order is the flat order.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from recbole.data.interaction import Interaction

LEAVE_ONE_OUT = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}


class SequenceStore:
    """Every kept interaction, user after user, in ``(user, time)`` order.

    Args:
        columns: per-row values of every ``.inter`` field but the user id, in that order; token ids
            as ``int32`` where they fit, floats as ``float32`` (RecBole's own precision).
        dtypes: the dtype RecBole gives each field in a batch (``int64`` tokens, ``float32`` floats).
        user_offsets: ``[user_num + 1]`` ``int64``; user ``u``'s rows are ``user_offsets[u]:user_offsets[u+1]``.
        fields: the ``.inter`` fields in RecBole's column order (the user id included).
        list_fields: the fields that get a ``<field><list_suffix>`` column (the item id first).
    """

    def __init__(self, columns: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype], user_offsets: torch.Tensor,
                 fields: Sequence[str], uid_field: str, time_field: str, max_len: int,
                 list_fields: Sequence[str], list_suffix: str, length_field: str):
        self.columns = columns
        self.dtypes = dtypes
        self.user_offsets = user_offsets
        self.fields = list(fields)
        self.uid_field = uid_field
        self.time_field = time_field
        self.max_len = int(max_len)
        self.list_fields = [f for f in self.fields if f in set(list_fields)]
        self.list_suffix = list_suffix
        self.length_field = length_field
        self.n_rows = int(user_offsets[-1])
        self.position_dtype = torch.int32 if self.n_rows < 2**31 else torch.int64

    # --- one batch ---------------------------------------------------------------------------
    def user_of(self, pos: torch.Tensor) -> torch.Tensor:
        """The user id of each flat position (``int64``)."""
        return torch.searchsorted(self.user_offsets, pos, right=True) - 1

    def batch(self, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """RecBole's augmented rows for the target positions ``pos``, fields in RecBole's order."""
        pos = pos.to(torch.int64)
        user = self.user_of(pos)
        start = torch.maximum(self.user_offsets[user], pos - self.max_len)
        length = pos - start
        out = {}
        for field in self.fields:
            out[field] = user if field == self.uid_field else self.columns[field][pos].to(self.dtypes[field])
        out[self.length_field] = length
        if self.list_fields:
            steps = torch.arange(self.max_len)
            pad = steps[None, :] >= length[:, None]  # [B, L]: RecBole's lists are left-aligned
            index = (start[:, None] + steps[None, :]).masked_fill_(pad, 0)
            for field in self.list_fields:
                values = self.columns[field][index].to(self.dtypes[field])
                out[field + self.list_suffix] = values.masked_fill_(pad, 0)
        return out

    def column(self, field: str, pos: torch.Tensor) -> torch.Tensor:
        """One field of the examples at ``pos``; ``item_length`` and lists are built like batches."""
        pos = pos.to(torch.int64)
        if field == self.uid_field:
            return self.user_of(pos)
        if field in self.columns:
            return self.columns[field][pos].to(self.dtypes[field])
        if len(pos) == 0:
            return self.batch(pos)[field]
        return torch.cat([self.batch(chunk)[field] for chunk in pos.split(1 << 20)])

    @property
    def field_names(self) -> list[str]:
        """The batch's fields, in RecBole's order."""
        return self.fields + [self.length_field] + [f + self.list_suffix for f in self.list_fields]

    # --- the splits ---------------------------------------------------------------------------
    def leave_one_out(self, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target positions of the train / valid / test splits, in RecBole's order (``build()``
        with ``eval_args: {split: {LS: mode}, order: TO}``)."""
        offsets = self.user_offsets.numpy()
        starts, ends = offsets[:-1], offsets[1:]
        examples = np.maximum(ends - starts - 1, 0)
        users = np.flatnonzero(examples > 0)
        first = starts[users] + 1
        times = self.columns[self.time_field].numpy()
        # groups in order of each user's first example in the time-sorted examples (time, then position)
        users = users[np.lexsort((first, times[first]))]
        count = examples[users]
        left_out = np.minimum(LEAVE_ONE_OUT[mode], count - 1)
        train = _ranges(starts[users] + 1, count - left_out, self.position_dtype)
        last, second = ends[users] - 1, ends[users] - 2
        if mode == "valid_and_test":
            valid, test = second[left_out == 2], last[left_out >= 1]
        elif mode == "valid_only":
            valid, test = last[left_out == 1], last[:0]
        else:
            valid, test = last[:0], last[left_out == 1]
        return train, self._positions(valid), self._positions(test)

    def time_order(self) -> torch.Tensor:
        """Every example's target position, sorted by target time (stable): the whole dataset's
        ``inter_feat`` order after RecBole's ``build()``."""
        offsets = self.user_offsets.numpy()
        starts, ends = offsets[:-1], offsets[1:]
        pos = _ranges(starts + 1, np.maximum(ends - starts - 1, 0), self.position_dtype)
        order = np.argsort(self.columns[self.time_field][pos.to(torch.int64)].numpy(), kind="stable")
        return pos[torch.from_numpy(order)]

    def _positions(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.position_dtype)


def _ranges(first: np.ndarray, lengths: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``concat(arange(f, f + n) for f, n in zip(first, lengths))`` without a Python loop."""
    np_dtype = np.int32 if dtype == torch.int32 else np.int64
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths
    out = np.repeat((first - before).astype(np_dtype), lengths)
    out += np.arange(total, dtype=np_dtype)
    return torch.from_numpy(out)


class SequenceView:
    """A split (or all examples) as RecBole's ``Interaction``: ``view[field]`` is a column,
    ``view[index]`` a batch ``Interaction`` whose lists are built now (DESIGN.md §5.2).

    ``positions`` are the examples' target positions in the store; a callable computes them on
    first use (the whole dataset's time order is rarely needed).
    """

    def __init__(self, store: SequenceStore, positions: torch.Tensor | Callable[[], torch.Tensor]):
        self.store = store
        self._positions = positions

    @property
    def positions(self) -> torch.Tensor:
        if callable(self._positions):
            self._positions = self._positions()
        return self._positions

    @property
    def length(self) -> int:
        return len(self.positions)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.field_names)

    @property
    def columns(self) -> list[str]:
        return self.store.field_names

    def __contains__(self, field: str) -> bool:
        return field in self.store.field_names

    def __getitem__(self, index):
        if isinstance(index, str):
            if index not in self:
                raise KeyError(index)
            return self.store.column(index, self.positions)
        if isinstance(index, (int, np.integer)):  # one row: 0-d values, as Interaction[int]
            row = self.store.batch(self.positions[[int(index)]])
            return Interaction({field: value[0] for field, value in row.items()})
        return Interaction(self.store.batch(self.positions[_as_index(index)]))

    def sort(self, by, ascending=True) -> None:
        """``Interaction.sort``: stable argsort per key, last key first; descending reverses."""
        by = [by] if isinstance(by, str) else list(by)
        ascending = [ascending] * len(by) if isinstance(ascending, bool) else list(ascending)
        if len(ascending) == 1:
            ascending = ascending * len(by)
        for field, up in zip(by[::-1], ascending[::-1]):
            key = self[field]
            key = key if key.dim() == 1 else key[..., 0]
            order = np.argsort(key.numpy(), kind="stable")
            if not up:
                order = order[::-1].copy()
            self._positions = self.positions[torch.from_numpy(order)]

    def shuffle(self) -> None:
        """``Interaction.shuffle``: one ``torch.randperm`` of the global generator."""
        self._positions = self.positions[torch.randperm(self.length)]

    def __repr__(self) -> str:
        return f"SequenceView({self.length} examples; fields {self.columns})"


def _as_index(index):
    """An index for the positions tensor (RecBole's ``Interaction`` goes through ``index.tolist()``)."""
    if isinstance(index, slice):
        return index
    if isinstance(index, torch.Tensor):
        return index if index.dtype == torch.bool else index.to(torch.int64)
    array = np.asarray(index)
    if array.dtype == bool:
        return torch.from_numpy(array)
    return torch.from_numpy(array.astype(np.int64, copy=False))


class RowsView:
    """The dataset's interactions before ``build()``: one row per kept interaction, in
    ``(user, time)`` order (RecBole's DataFrame is in file order at this stage)."""

    def __init__(self, store: SequenceStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.n_rows

    @property
    def length(self) -> int:
        return self.store.n_rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.fields)

    @property
    def columns(self) -> list[str]:
        return list(self.store.fields)

    def __contains__(self, field: str) -> bool:
        return field in self.store.fields

    def __getitem__(self, field: str) -> torch.Tensor:
        if not isinstance(field, str):
            raise TypeError("before build(), the lean dataset's interactions are read by field only")
        store = self.store
        if field == store.uid_field:
            counts = store.user_offsets[1:] - store.user_offsets[:-1]
            return torch.repeat_interleave(torch.arange(len(counts)), counts)
        return store.columns[field].to(store.dtypes[field])
