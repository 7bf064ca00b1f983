"""RecBole's ``SequentialDataset`` with O(N) memory: ``sequence_data: lean`` (DESIGN.md §5.1-5.2).

:class:`LeanSequentialDataset` keeps RecBole's class and its code for the ``.user`` / ``.item``
tables, and replaces what grows with the ``.inter`` file:

- loading: token columns as ``int32`` codes (:mod:`~recbole_popprior.data.inter_codes`);
- filtering: missing ids, ``filter_inter_by_user_or_item`` and the interaction-count filter
  (:mod:`~recbole_popprior.data.filtering`), in RecBole's order and with its rules;
- remapping: ids in ``pandas.factorize`` order (:mod:`~recbole_popprior.data.remap`);
- augmentation and splitting: a :class:`~recbole_popprior.data.sequences.SequenceStore` and its
  views, which build each batch's lists when the dataloader indexes them.

:func:`lean_unsupported` names the settings where the result could differ from RecBole's; there
(and for ``.inter`` files the pyarrow reader does not take) :func:`create_dataset` uses RecBole's
own class, with one INFO line saying why.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import recbole.data.dataset as recbole_datasets
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.utils import FeatureSource, FeatureType

from recbole_popprior.data.atomic_files import (AtomicFileGuard, RecBoleReaderGuard, bad_number_message,
                                                check_header, check_id_columns, inter_id_fields, no_rows_message)
from recbole_popprior.data.fast_loader import FastLoadMixin, _Unsupported
from recbole_popprior.data.filtering import filter_by_inter_num
from recbole_popprior.data.inter_codes import InterCodes, read_inter_codes
from recbole_popprior.data.remap import remap
from recbole_popprior.data.row_shapes import scan_rows
from recbole_popprior.data.sequences import LEAVE_ONE_OUT, RowsView, SequenceStore, SequenceView
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.registry import recbole_model_name

#: RecBole settings the lean path does not reproduce (each changes loading or splitting).
_UNSET_KEYS = ("benchmark_filename", "rm_dup_inter", "val_interval", "threshold", "discretization", "preload_weight",
               "unused_col", "alias_of_user_id", "alias_of_item_id", "additional_feat_suffix")

#: models that read more than one batch's lists from the dataset itself.
_WHOLE_LIST_READERS = {
    "FEARec": "FEARec reads item lists of other training examples (dataset.inter_feat[item_id_list])",
}


def lean_unsupported(config: Any) -> str | None:
    """Why ``sequence_data: lean`` cannot promise RecBole's exact data for this config, or ``None``."""
    model = recbole_model_name(config)  # a user's subclass reads as its registered parent
    own = getattr(recbole_datasets, f"{model}Dataset", None)
    if own is not None:
        return f"{model} has its own dataset class ({own.__name__})"
    if model in _WHOLE_LIST_READERS:
        return _WHOLE_LIST_READERS[model]
    for key in _UNSET_KEYS:
        if config[key]:
            return f"{key} is set"
    if config["numerical_features"]:
        return "numerical_features is set"
    if not config["USER_ID_FIELD"] or not config["ITEM_ID_FIELD"]:
        return "USER_ID_FIELD or ITEM_ID_FIELD is not set"
    eval_args = config["eval_args"] or {}
    split = eval_args.get("split") or {}
    if list(split) != ["LS"] or split["LS"] not in LEAVE_ONE_OUT:
        return f"eval_args split {split} (the lean path splits leave-one-out: LS)"
    if eval_args.get("order") != "TO":
        return f"eval_args order {eval_args.get('order')!r} (sequential data is ordered by time: TO)"
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        return f"MAX_ITEM_LIST_LENGTH={max_len!r}"
    return None


def list_fields(config: Any) -> list[str]:
    """The ``.inter`` fields whose lists a batch carries: the item id, and the time field where the
    model reads ``<time><LIST_SUFFIX>`` (the plugin's BERT4Rec with a windowed prior)."""
    fields = [config["ITEM_ID_FIELD"]]
    if recbole_model_name(config) == "BERT4Rec" and config["prior_mode"] == "windowed":
        fields.append(config["TIME_FIELD"])
    return fields


def missing_time_field(field: str | None) -> PopPriorError:
    """The one-line error for sequential data without its time field (every path says the same)."""
    return PopPriorError(f"sequential models need the time field {field!r}: load it from the .inter file "
                         "(load_col: {inter: [user_id, item_id, timestamp]})")


class LeanSequentialDataset(AtomicFileGuard, FastLoadMixin, RecBoleReaderGuard, SequentialDataset):
    """``SequentialDataset`` whose interactions cost O(N) memory (DESIGN.md §5.2).

    Before ``build()``, ``inter_feat`` is a :class:`RowsView` (one row per interaction, by user
    then time); after it, a :class:`SequenceView` of every example in time order, built on first
    use; the splits ``build()`` returns hold views of their examples.
    """

    # --- loading -------------------------------------------------------------------------------
    def _load_inter_feat(self, token, dataset_path):
        path = os.path.join(dataset_path, f"{token}.inter")
        if not os.path.isfile(path):
            raise ValueError(f"File {path} not exist.")
        load_col, unload_col = self._get_load_and_unload_col(FeatureSource.INTERACTION)
        if load_col == set():
            raise _Unsupported("no .inter column is loaded")
        separator, encoding = self.config["field_separator"], self.config["encoding"]
        header = check_header(path, separator, encoding)
        check_id_columns(path, header, inter_id_fields(self.config), load_col)
        try:
            codes = read_inter_codes(path, load_col, unload_col, separator, encoding)
        except _Unsupported as why:  # a malformed file is an error, not a reason to try RecBole's reader
            if str(why) == "no rows":
                raise PopPriorError(no_rows_message(path)) from None
            if "conversion error" in str(why):
                shapes = scan_rows(path, separator, len(header))
                message = bad_number_message(path, separator, encoding, header, shapes.shift if shapes else 0)
                if message:
                    raise PopPriorError(message) from None
            raise
        if codes.shapes is not None and codes.shapes.irregular:  # read as RecBole's reader reads them
            self.logger.warning(codes.shapes.message(os.path.basename(path)))
        loaded = dict(codes.fields)
        if loaded.get(self.uid_field) != FeatureType.TOKEN or loaded.get(self.iid_field) != FeatureType.TOKEN:
            raise _Unsupported("the user and item id columns are not both loaded as tokens")
        if self.time_field is None or self.time_field not in loaded:
            raise missing_time_field(self.time_field)
        if loaded[self.time_field] != FeatureType.FLOAT:
            raise _Unsupported(f"time field {self.time_field} is not a float column")
        for field, ftype in codes.fields:  # the bookkeeping RecBole's _load_feat does
            self.field2source[field] = FeatureSource.INTERACTION
            self.field2type[field] = ftype
            self.field2seqlen[field] = 1
            if ftype == FeatureType.FLOAT:
                self.field2bucketnum[field] = 2
        self.inter_feat = codes

    # --- filtering, remapping, the store ---------------------------------------------------------
    def _data_processing(self):
        codes: InterCodes = self.inter_feat
        for feat in (self.user_feat, self.item_feat):
            shared = [f for f, _ in codes.fields if feat is not None and f in feat and f not in
                      (self.uid_field, self.iid_field)]
            if shared:
                raise _Unsupported(f".inter and a feature file both hold {shared[0]}")
        self.feat_name_list = self._build_feat_name_list()
        self._filter_codes(codes)
        self._remap_codes(codes)
        self._user_item_feat_preparation()
        with self._inter_floats_as_frame(codes):
            self._fill_nan()
            self._normalize()
        self._store = self._build_store(codes)
        self.inter_feat = RowsView(self._store)

    def _filter_codes(self, codes: InterCodes) -> None:
        """RecBole's ``_data_filtering`` (no value filters, no duplicate removal: see
        :func:`lean_unsupported`) on codes; feature tables as RecBole does it."""
        uid, iid = self.uid_field, self.iid_field
        for field, feat in ((uid, self.user_feat), (iid, self.item_feat)):  # _filter_nan_user_or_item
            if feat is not None:
                dropped = feat.index[feat[field].isnull()]
                if len(dropped):  # RecBole's expression, labels used as positions (its quirk kept)
                    self.logger.warning(f"{len(dropped)} rows of a feature table have no {field}; they are removed.")
                    feat.drop(feat.index[dropped], inplace=True)
        users, items = codes.columns[uid], codes.columns[iid]
        if min(users.min(initial=0), items.min(initial=0)) < 0:  # (no row mask when no id is missing)
            missing = (users < 0) | (items < 0)
            self.logger.warning(f"In inter_feat, {int(missing.sum())} rows have no {uid} or {iid}; they are removed.")
            codes.keep(~missing)
        del users, items
        if self.config["filter_inter_by_user_or_item"] is True:  # _filter_inter_by_user_or_item
            keep = np.ones(len(codes), dtype=bool)
            for field, feat in ((uid, self.user_feat), (iid, self.item_feat)):
                if feat is not None:
                    known = np.zeros(len(codes.vocab[field]) + 1, dtype=bool)
                    known[self._feat_codes(codes, field, feat)] = True
                    known[-1] = False
                    keep &= known[codes.columns[field]]
            codes.keep(keep)
        user_feat_codes = None if self.user_feat is None else self._feat_codes(codes, uid, self.user_feat)
        item_feat_codes = None if self.item_feat is None else self._feat_codes(codes, iid, self.item_feat)
        alive, user_keep, item_keep = filter_by_inter_num(
            codes.columns[uid], codes.columns[iid], len(codes.vocab[uid]), len(codes.vocab[iid]),
            self._parse_intervals_str(self.config["user_inter_num_interval"]),
            self._parse_intervals_str(self.config["item_inter_num_interval"]),
            self._within_intervals, user_feat_codes, item_feat_codes)
        for feat, keep in ((self.user_feat, user_keep), (self.item_feat, item_keep)):
            if feat is not None and not keep.all():
                feat.drop(feat.index[~keep], inplace=True)
        codes.keep(alive)
        if len(codes) == 0:
            raise PopPriorError(f"dataset {self.dataset_name!r}: no interaction is left after filtering "
                                f"(user_inter_num_interval={self.config['user_inter_num_interval']!r}, "
                                f"item_inter_num_interval={self.config['item_inter_num_interval']!r})")
        for name, feat in (("user", self.user_feat), ("item", self.item_feat)):  # _reset_index
            if feat is not None:
                if feat.empty:
                    raise PopPriorError(f"dataset {self.dataset_name!r}: the .{name} table is empty after filtering")
                feat.reset_index(drop=True, inplace=True)

    @staticmethod
    def _feat_codes(codes: InterCodes, field: str, feat: pd.DataFrame) -> np.ndarray:
        """The code of each feature-table row's id (``-1`` where no ``.inter`` row has the token)."""
        vocab = codes.vocab[field]
        if len(vocab) == 0:
            return np.full(len(feat), -1, dtype=np.int64)
        return pd.Index(vocab).get_indexer(feat[field].to_numpy(dtype=object))

    def _remap_codes(self, codes: InterCodes) -> None:
        """RecBole's ``_remap_ID_all``: user and item ids over ``.inter`` then their table, every
        other token field on its own (``.inter`` fields here, table fields by RecBole's code)."""
        for field, feat in ((self.uid_field, self.user_feat), (self.iid_field, self.item_feat)):
            tokens = None if feat is None else feat[field].to_numpy(dtype=object)
            mapping, feat_ids = remap(codes.columns[field], codes.vocab[field], tokens)
            self.field2id_token[field], self.field2token_id[field] = mapping.id_token, mapping.token_id
            codes.columns[field] = mapping.ids(codes.columns[field])
            if feat is not None:
                feat[field] = feat_ids
        for field in self._rest_fields:
            if field in codes.columns:
                mapping, _ = remap(codes.columns[field], codes.vocab[field])
                self.field2id_token[field], self.field2token_id[field] = mapping.id_token, mapping.token_id
                codes.columns[field] = mapping.ids(codes.columns[field])
            else:
                self._remap(self._get_remap_list(np.array([field])))
        codes.vocab.clear()

    @contextlib.contextmanager
    def _inter_floats_as_frame(self, codes: InterCodes) -> Iterator[None]:
        """Lend the ``.inter`` float columns to RecBole's ``_fill_nan`` / ``_normalize`` as a DataFrame
        (token columns are ids by now, with nothing to fill or scale), then take them back."""
        floats = [field for field, ftype in codes.fields if ftype == FeatureType.FLOAT]
        self.inter_feat = pd.DataFrame({field: codes.columns[field] for field in floats}, copy=False)
        try:
            yield
            for field in floats:
                codes.columns[field] = np.asarray(self.inter_feat[field].to_numpy(), dtype=np.float64)
        finally:
            self.inter_feat = codes

    def _build_store(self, codes: InterCodes) -> SequenceStore:
        """The rows in RecBole's augmentation order, ``sort(by=[uid, time])`` (stable), as compact columns."""
        users = codes.columns.pop(self.uid_field)
        times = codes.columns.pop(self.time_field).astype(np.float32)  # RecBole sorts its float32 copy
        order = _user_time_order(users, times)
        counts = np.bincount(users, minlength=self.user_num)
        del users
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        columns, dtypes = {}, {self.uid_field: torch.int64}
        for field, ftype in codes.fields:
            if field == self.uid_field:
                continue
            values = times if field == self.time_field else codes.columns.pop(field)
            if ftype == FeatureType.FLOAT:
                values, dtypes[field] = values.astype(np.float32, copy=False), torch.float32
            else:
                dtypes[field] = torch.int64
            columns[field] = torch.from_numpy(np.ascontiguousarray(values if order is None else values[order]))
            del values
        del times, order
        return SequenceStore(columns, dtypes, torch.from_numpy(offsets), [f for f, _ in codes.fields],
                             self.uid_field, self.time_field, self.max_item_list_len, list_fields(self.config),
                             self.config["LIST_SUFFIX"], self.item_list_length_field)

    @contextlib.contextmanager
    def _feature_tables_only(self) -> Iterator[None]:
        """Run a RecBole step that loops over ``feat_name_list`` on the ``.user`` / ``.item`` tables only."""
        names = self.feat_name_list
        self.feat_name_list = [name for name in names if name != "inter_feat"]
        try:
            yield
        finally:
            self.feat_name_list = names

    # --- splitting -----------------------------------------------------------------------------
    def build(self):
        """RecBole's ``build()`` for ``eval_args: {order: TO, split: {LS: ...}}``: user and item
        tables become ``Interaction``s, the splits views of the store (DESIGN.md §5.2)."""
        with self._feature_tables_only():
            Dataset._change_feat_format(self)
        suffix = self.config["LIST_SUFFIX"]
        for field in self._store.list_fields:  # SequentialDataset._aug_presets, for the lists built
            ftype = FeatureType.TOKEN_SEQ if self.field2type[field] == FeatureType.TOKEN else FeatureType.FLOAT_SEQ
            setattr(self, f"{field}_list_field", field + suffix)
            self.set_field_property(field + suffix, ftype, FeatureSource.INTERACTION, self.max_item_list_len)
        self.set_field_property(self.item_list_length_field, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)
        store = self._store
        train, valid, test = store.leave_one_out(self.config["eval_args"]["split"]["LS"])
        self.inter_feat = SequenceView(store, store.time_order)
        return [self.copy(SequenceView(store, positions)) for positions in (train, valid, test)]

    # --- RecBole's statistics, without a Counter over every row ---------------------------------
    @property
    def avg_actions_of_users(self):
        if isinstance(self.inter_feat, RowsView):  # before build(): the users' row counts are the offsets
            counts = np.diff(self._store.user_offsets.numpy())
            return np.mean(counts[counts > 0])
        return _mean_positive_count(self.inter_feat[self.uid_field])

    @property
    def avg_actions_of_items(self):
        return _mean_positive_count(self.inter_feat[self.iid_field])


def _mean_positive_count(ids: torch.Tensor) -> float:
    """``np.mean(list(Counter(ids).values()))``: counts are integers, so the float sum is exact."""
    counts = np.bincount(ids.numpy())
    return np.mean(counts[counts > 0])


def _user_time_order(users: np.ndarray, times: np.ndarray) -> np.ndarray | None:
    """RecBole's stable ``sort(by=[uid, time])`` (time first, then user), or ``None`` when the
    rows are already in that order (as the plugin's converters write them)."""
    if _sorted_by_user_and_time(users, times):
        return None
    order = np.argsort(times, kind="stable")
    return order[np.argsort(users[order], kind="stable")]


def _sorted_by_user_and_time(users: np.ndarray, times: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether ``(user, time)`` never decreases from row to row (a NaN time counts as a decrease)."""
    for start in range(0, max(len(users) - 1, 0), chunk):
        end = min(start + chunk + 1, len(users))
        user_step = np.diff(users[start:end])
        if (user_step < 0).any() or ((user_step == 0) & ~(np.diff(times[start:end]) >= 0)).any():
            return False
    return True
