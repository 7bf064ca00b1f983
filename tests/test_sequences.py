"""Lean sequential data (``sequence_data: lean``) gives RecBole's batches (DESIGN.md §5.2; issue 11).

The reference is RecBole's own path on the same config (``sequence_data: recbole`` and
``fast_loader: False``): every batch of the shuffled training loader (two epochs) and of the
validation / test loaders must hold the same fields, values, dtypes and order; the only fields
RecBole has and the lean batches lack are lists no model reads.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.data.dataloader import TrainDataLoader
from recbole.data.dataset import SequentialDataset
from recbole.utils import init_seed

from conftest import write_inter

from recbole_popprior.compare import data_digest
from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.data.inter_codes import read_inter_codes
from recbole_popprior.data import lean_dataset
from recbole_popprior.data.lean_dataset import LeanSequentialDataset
from recbole_popprior.data.loaders import LeanTrainDataLoader, _Batches
from recbole_popprior.data.remap import first_appearance
from recbole_popprior.errors import PopPriorError
from recbole_popprior.prior import estimate_log_prior

LS = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"}


def settings(**overrides) -> dict:
    config = {"state": "WARNING", "show_progress": False, "gpu_id": "", "train_neg_sample_args": None,
              "eval_args": LS, "train_batch_size": 64, "eval_batch_size": 100, "hidden_size": 8, "inner_size": 16,
              "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 7}
    config.update(overrides)
    return config


class Both:
    """The lean and RecBole datasets and dataloaders for one model and config."""

    def __init__(self, model: str, dataset: str, **overrides):
        self.lean = self._prepare(model, dataset, sequence_data="lean", fast_loader=True, **overrides)
        self.recbole = self._prepare(model, dataset, sequence_data="recbole", fast_loader=False, **overrides)

    @staticmethod
    def _prepare(model, dataset, **overrides) -> SimpleNamespace:
        config = Config(model=model, dataset=dataset, config_dict=settings(**overrides))
        init_seed(config["seed"], True)
        data = create_dataset(config)
        train, valid, test = data_preparation(config, data)
        return SimpleNamespace(config=config, dataset=data, train=train, valid=valid, test=test)


def batches(loader, epochs: int = 1) -> list:
    init_seed(7, True)  # the same global random state for both paths (BERT4Rec's masking draws from it)
    return [batch for _ in range(epochs) for batch in loader]


def assert_same_batches(lean, recbole, unread: set[str]) -> None:
    assert len(lean) == len(recbole) > 0
    for mine, theirs in zip(lean, recbole):
        if isinstance(theirs, tuple):  # evaluation: (interaction, history or row index, positive_u, positive_i)
            for a, b in zip(mine[1:], theirs[1:]):
                assert (a is None and b is None) or torch.equal(a, b)
            mine, theirs = mine[0], theirs[0]
        assert set(theirs.columns) - set(mine.columns) == unread
        assert set(mine.columns) <= set(theirs.columns)
        for field in mine.columns:
            assert mine[field].dtype == theirs[field].dtype, field
            assert torch.equal(mine[field], theirs[field]), field


def assert_same_data(both: Both, unread: set[str]) -> None:
    lean, recbole = both.lean, both.recbole
    assert type(lean.dataset) is LeanSequentialDataset
    # RecBole's class (with the plugin's checks of malformed files around its reader)
    assert isinstance(recbole.dataset, SequentialDataset) and not isinstance(recbole.dataset, LeanSequentialDataset)
    assert lean.dataset.user_num == recbole.dataset.user_num and lean.dataset.item_num == recbole.dataset.item_num
    assert lean.dataset.field2id_token.keys() == recbole.dataset.field2id_token.keys()
    for field, tokens in recbole.dataset.field2id_token.items():
        assert lean.dataset.field2id_token[field].dtype == tokens.dtype, field
        assert np.array_equal(lean.dataset.field2id_token[field], tokens), field
        assert lean.dataset.field2token_id[field] == recbole.dataset.field2token_id[field], field
    assert type(lean.train) is LeanTrainDataLoader and type(recbole.train) is TrainDataLoader
    assert_same_batches(batches(lean.train, 2), batches(recbole.train, 2), unread)
    assert_same_batches(batches(lean.valid), batches(recbole.valid), unread)
    assert_same_batches(batches(lean.test), batches(recbole.test), unread)


# --- ml-100k (ships with RecBole) -----------------------------------------------------------------
def test_ml100k_sasrec_batches_are_recboles():
    both = Both("SASRec", "ml-100k", MAX_ITEM_LIST_LENGTH=20, train_batch_size=2048,
                user_inter_num_interval="[5,inf)", item_inter_num_interval="[5,inf)")
    assert_same_data(both, {"rating_list", "timestamp_list"})


def test_ml100k_sasrecf_item_features_are_recboles():
    """SASRecF reads item features (a token_seq ``class`` from ml-100k.item) through the join."""
    both = Both("SASRecF", "ml-100k", train_batch_size=2048, selected_features=["class"],
                load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                          "item": ["item_id", "class", "release_year"]})
    assert "class" in both.lean.train.dataset[np.arange(3)].columns  # (iterating would use up the generator)
    assert_same_data(both, {"rating_list", "timestamp_list"})


# --- a messy generated dataset --------------------------------------------------------------------
def write_messy(root, name: str = "messy", seed: int = 0):
    """Rows in random file order; float32 ties in time (RecBole sorts float32 copies of
    1.5e9-second stamps, 128 s apart) and exact ties; tokens ``07`` and ``7``; empty ids; a
    rating with empty cells; an extra token column; ``.user`` / ``.item`` tables with ids the
    interactions lack, a duplicate, an empty id, and interactions whose item has no row."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, 71):
        length = int(rng.integers(1, 30))
        items = np.minimum(rng.zipf(1.3, size=length), 45)
        stamps = 1_500_000_000 + np.sort(rng.integers(0, 3000, size=length))
        user = "07" if u == 7 else str(u)
        for item, stamp in zip(items, stamps):
            rating = "" if rng.random() < 0.05 else f"{rng.integers(1, 6)}"
            rows.append((user, f"i{item}", rating, int(stamp), f"c{item % 4}"))
    rows.append(("7", "i1", "3", 1_500_000_100, "c1"))
    rows.append(("", "i2", "3", 1_500_000_100, "c2"))
    rows.append(("5", "", "3", 1_500_000_100, "c2"))
    order = rng.permutation(len(rows))
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\tcategory:token"
    write_inter(root / name / f"{name}.inter", [rows[i] for i in order], header=header)
    # (the empty id comes before the duplicate: RecBole drops empty ids by position, which
    # breaks once drop_duplicates has left a gap in the index)
    users = (["user_id:token\tage:token"] + [f"{u}\t{20 + u % 7}" for u in [*range(1, 60), 500]] + ["\t30"]
             + [f"{u}\t{20 + u % 7}" for u in (501, 3)])
    (root / name / f"{name}.user").write_text("\n".join(users) + "\n", encoding="utf-8")
    items = ["item_id:token\tprice:float"] + [f"i{i}\t{i * 1.5}" for i in range(1, 44) if i != 9] + ["i900\t2.0"]
    (root / name / f"{name}.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return write_messy(tmp_path_factory.mktemp("messy"))


MESSY_COLUMNS = {"inter": ["user_id", "item_id", "rating", "timestamp", "category"],
                 "user": ["user_id", "age"], "item": ["item_id", "price"]}


@pytest.mark.parametrize("intervals", [("[5,inf)", "[5,inf)"), ("(1,20];[25,inf)", "[2,30]"), (None, "[3,inf)")],
                         ids=["5-core", "intervals", "items-only"])
def test_messy_data_with_filtering_and_ties_is_recboles(messy, intervals):
    both = Both("SASRec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS, MAX_ITEM_LIST_LENGTH=5,
                user_inter_num_interval=intervals[0], item_inter_num_interval=intervals[1], normalize_all=True)
    recbole = both.recbole.dataset
    assert 0 < recbole.inter_num < 1200  # the filter removed users and items
    pd.testing.assert_frame_equal(pd.DataFrame(both.lean.dataset.user_feat.numpy()),
                                  pd.DataFrame(recbole.user_feat.numpy()))
    assert_same_data(both, {"rating_list", "timestamp_list", "category_list"})


def test_bert4rec_windowed_prior_gets_recboles_time_lists(messy):
    """The plugin's BERT4Rec reads ``timestamp_list`` with a windowed prior: it is built, and
    RecBole's masking transform (run on the lean batch) gives the same masks."""
    both = Both("BERT4Rec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS, prior_mode="windowed",
                user_inter_num_interval="[3,inf)", item_inter_num_interval="[2,inf)")
    assert "timestamp_list" in both.lean.train.dataset[np.arange(3)].columns
    assert_same_data(both, {"rating_list", "category_list"})


def test_rows_already_in_user_time_order_skip_the_sort_and_are_recboles(tmp_path, monkeypatch):
    """The plugin's converters write rows by user, then time: the stable sort is the identity."""
    rng = np.random.default_rng(4)
    rows = [(u, int(i), 1_500_000_000 + int(t)) for u in range(1, 41)
            for i, t in zip(rng.integers(1, 30, size=12), np.sort(rng.integers(0, 900, size=12)))]
    write_inter(tmp_path / "ordered" / "ordered.inter", rows)
    orders = []
    real = lean_dataset._user_time_order
    monkeypatch.setattr(lean_dataset, "_user_time_order", lambda users, times: orders.append(real(users, times)))
    both = Both("SASRec", "ordered", data_path=str(tmp_path), MAX_ITEM_LIST_LENGTH=4)
    assert orders == [None]
    assert_same_data(both, {"timestamp_list"})


@pytest.mark.parametrize("mode", ["uni100", "pop50"])
def test_sampled_evaluation_is_recboles(messy, mode):
    """Negative-sampling evaluation sorts the split by user and slices it; popularity sampling
    counts the items of the whole dataset after build() (its time-ordered examples)."""
    both = Both("SASRec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS, user_inter_num_interval="[3,inf)",
                eval_args={**LS, "mode": mode})
    unread = {"rating_list", "timestamp_list", "category_list"}
    assert_same_batches(batches(both.lean.valid), batches(both.recbole.valid), unread)
    assert_same_batches(batches(both.lean.test), batches(both.recbole.test), unread)


@pytest.mark.parametrize("split", ["valid_only", "test_only"])
def test_other_leave_one_out_modes_are_recboles(messy, split):
    both = Both("SASRec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS, user_inter_num_interval="[2,inf)",
                eval_args={**LS, "split": {"LS": split}})
    for name in ("train", "valid", "test"):
        mine, theirs = getattr(both.lean, name).dataset.inter_feat, getattr(both.recbole, name).dataset.inter_feat
        assert len(mine) == len(theirs)
        for field in ("user_id", "item_id", "item_length", "item_id_list"):
            assert torch.equal(mine[field], theirs[field]), (name, field)


def test_what_the_plugin_reads_from_the_training_split_is_recboles(messy):
    both = Both("SASRec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS,
                user_inter_num_interval="[4,inf)", item_inter_num_interval="[2,inf)")
    lean, recbole = both.lean.train.dataset, both.recbole.train.dataset
    for field in ("user_id", "item_id", "timestamp", "rating", "item_length", "item_id_list"):
        assert torch.equal(lean.inter_feat[field], recbole.inter_feat[field]), field
        assert field in lean.inter_feat
    assert "timestamp_list" not in lean.inter_feat and "timestamp" in lean.inter_feat
    assert len(lean) == len(recbole)
    assert lean.item_counter == recbole.item_counter
    assert data_digest(SimpleNamespace(train_data=both.lean.train, valid_data=both.lean.valid,
                                       test_data=both.lean.test)) == \
        data_digest(SimpleNamespace(train_data=both.recbole.train, valid_data=both.recbole.valid,
                                    test_data=both.recbole.test))
    assert torch.equal(estimate_log_prior(lean.inter_feat["item_id"], lean.item_num),
                       estimate_log_prior(recbole.inter_feat["item_id"], recbole.item_num))
    # the whole dataset after build(): every example in time order, as RecBole's
    whole_lean, whole_recbole = both.lean.dataset.inter_feat, both.recbole.dataset.inter_feat
    for field in ("user_id", "item_id", "item_length"):
        assert torch.equal(whole_lean[field], whole_recbole[field]), field
    # sorting a split (what uni100 evaluation does) is Interaction.sort
    for view, inter in ((lean.inter_feat, recbole.inter_feat),):
        view.sort(by=["item_id", "user_id"])  # (RecBole's descending sort crashes on torch 2)
        inter.sort(by=["item_id", "user_id"])
        assert torch.equal(view["timestamp"], inter["timestamp"])
        assert torch.equal(view[np.arange(5)]["item_id_list"], inter[np.arange(5)]["item_id_list"])


def test_dataset_summary_before_build_is_recboles(messy):
    """What the quick start logs after loading: user/item/interaction counts, averages, sparsity."""
    summaries = []
    for path in ("lean", "recbole"):
        config = Config(model="SASRec", dataset="messy", config_dict=settings(
            data_path=str(messy), load_col=MESSY_COLUMNS, sequence_data=path, user_inter_num_interval="[3,inf)"))
        summaries.append(str(create_dataset(config)))
    assert summaries[0] == summaries[1]


def test_lean_store_is_linear_in_the_interactions(messy):
    """No ``[N, MAX_ITEM_LIST_LENGTH]`` tensor is kept: per-interaction arrays only."""
    both = Both("SASRec", "messy", data_path=str(messy), load_col=MESSY_COLUMNS, MAX_ITEM_LIST_LENGTH=50,
                user_inter_num_interval="[2,inf)")
    store = both.lean.dataset._store
    assert all(column.dim() == 1 and len(column) == store.n_rows for column in store.columns.values())
    splits = [loader.dataset.inter_feat.positions for loader in (both.lean.train, both.lean.valid, both.lean.test)]
    stored = sum(c.numel() * c.element_size() for c in [*store.columns.values(), *splits])
    assert stored <= 4 * (len(store.columns) + 1) * store.n_rows
    assert both.recbole.train.dataset.inter_feat["item_id_list"].shape[1] == 50


# --- the pieces ---------------------------------------------------------------------------------------
def test_blockwise_codes_read_what_pandas_reads(tmp_path):
    """Many small blocks (each with its own pyarrow dictionary), long rows first so that the
    column buffers must grow: every cell decodes to pandas' string (NaN where empty), and the
    vocabulary is in order of first appearance."""
    rng = np.random.default_rng(2)
    path = tmp_path / "blocks.inter"
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for row in range(6000):
        user = "" if row % 997 == 5 else (f"{'x' * 40}{row % 50}" if row < 300 else f"{rng.integers(0, 80):02d}")
        item = "NA" if row % 1013 == 7 else str(int(rng.zipf(1.5)) % 400)
        stamp = "" if row % 1500 == 3 else f"{1.5e9 + row * 0.25:.2f}"
        lines.append(f"{user}\t{item}\t{stamp}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    codes = read_inter_codes(path, None, None, "\t", "utf-8", block_size=4096)
    frame = pd.read_csv(path, sep="\t", dtype=str, engine="python")
    for field in ("user_id", "item_id"):
        expected = frame[f"{field}:token"].to_numpy(dtype=object)
        c = codes.columns[field]
        got = np.where(c >= 0, codes.vocab[field][np.maximum(c, 0)], None)
        assert np.array_equal(pd.isna(expected), c < 0)
        assert got[c >= 0].tolist() == expected[c >= 0].tolist()
        assert codes.vocab[field].tolist() == pd.unique(expected[c >= 0]).tolist()
    stamps = pd.read_csv(path, sep="\t", dtype={"timestamp:float": np.float64}, engine="python")["timestamp:float"]
    np.testing.assert_array_equal(codes.columns["timestamp"], stamps.to_numpy())


def test_first_appearance_is_pandas_factorize_order():
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 300, size=20_000).astype(np.int32)
    expected, _ = pd.factorize(np.where(codes >= 0, codes, np.nan))
    uniques = pd.unique(codes[codes >= 0])
    assert np.array_equal(first_appearance(codes, 300), uniques)
    assert expected.max() + 1 == len(uniques)


@pytest.mark.parametrize("n", [192, 200])
def test_batches_match_torch_random_sampler_over_epochs(n):
    """Same index batches as ``BatchSampler(RandomSampler)``, and the generator left in the same
    state after every epoch (RandomSampler draws a second permutation at the end)."""
    step = 64
    mine, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(n), generator=theirs), step, False)
    for _ in range(3):
        assert [b.tolist() for b in _Batches(n, step, True, mine)] == list(sampler)
        assert torch.equal(mine.get_state(), theirs.get_state())


# --- where the lean path is not used --------------------------------------------------------------
@pytest.mark.parametrize("overrides, reason", [
    ({"eval_args": {**LS, "split": {"RS": [0.8, 0.1, 0.1]}}}, "split"),
    ({"rm_dup_inter": "first"}, "rm_dup_inter"),
    ({"model": "FEARec"}, "FEARec reads"),
    ({"sequence_data": "recbole"}, None),
])
def test_unsupported_settings_fall_back_to_recbole_with_one_line(tmp_path, caplog, overrides, reason):
    write_inter(tmp_path / "tiny" / "tiny.inter", [(u, i, 10 * u + i) for u in range(1, 9) for i in range(1, 7)])
    model = overrides.pop("model", "SASRec")
    config = Config(model=model, dataset="tiny", config_dict=settings(data_path=str(tmp_path), **overrides))
    with caplog.at_level(logging.INFO):
        dataset = create_dataset(config)
    assert isinstance(dataset, SequentialDataset) and not isinstance(dataset, LeanSequentialDataset)
    lines = [r.getMessage() for r in caplog.records if "sequence_data: lean is not used" in r.getMessage()]
    assert len(lines) == (0 if reason is None else 1)
    assert reason is None or reason in lines[0]


def test_token_seq_inter_column_falls_back_to_recbole(tmp_path, caplog):
    rows = [(u, i, 10 * u + i, f"a b{i}") for u in range(1, 9) for i in range(1, 7)]
    write_inter(tmp_path / "seqs" / "seqs.inter", rows,
                header="user_id:token\titem_id:token\ttimestamp:float\ttags:token_seq")
    config = Config(model="SASRec", dataset="seqs", config_dict=settings(
        data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp", "tags"]}))
    with caplog.at_level(logging.INFO):
        dataset = create_dataset(config)
    assert isinstance(dataset, SequentialDataset) and not isinstance(dataset, LeanSequentialDataset)
    assert any("token_seq column tags" in r.getMessage() for r in caplog.records)


def test_bad_sequence_data_value_is_one_clear_line(tmp_path):
    with pytest.raises(PopPriorError, match="sequence_data must be one of lean, recbole"):
        Config(model="SASRec", dataset="tiny", config_dict=settings(data_path=str(tmp_path), sequence_data="fast"))


def test_missing_time_field_is_one_clear_line(tmp_path):
    write_inter(tmp_path / "tiny" / "tiny.inter", [(u, i, 10 * u + i) for u in range(1, 9) for i in range(1, 7)])
    config = Config(model="SASRec", dataset="tiny", config_dict=settings(
        data_path=str(tmp_path), load_col={"inter": ["user_id", "item_id"]}))
    with pytest.raises(PopPriorError, match="need the time field 'timestamp'"):
        create_dataset(config)
