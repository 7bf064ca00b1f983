"""FastLoadMixin gives exactly the Dataset RecBole's own reader gives.

Both datasets go through the whole RecBole pipeline (filtering, remapping, conversion to
Interaction); the reference is RecBole's unmodified class on the same config.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.data.dataset import Dataset, SequentialDataset

from recbole_popprior.config import Config
from recbole_popprior.data import fast_loader
from recbole_popprior.data.fast_loader import FastLoadMixin

from conftest import write_inter

FastDataset = type("Dataset", (FastLoadMixin, Dataset), {})
FastSequentialDataset = type("SequentialDataset", (FastLoadMixin, SequentialDataset), {})


def assert_same_dataset(slow, fast) -> None:
    assert fast.user_num == slow.user_num and fast.item_num == slow.item_num
    assert set(fast.field2id_token) == set(slow.field2id_token)
    for field, tokens in slow.field2id_token.items():
        assert fast.field2id_token[field].tolist() == tokens.tolist(), field
        assert fast.field2token_id[field] == slow.field2token_id[field], field
    assert fast.field2type == slow.field2type and fast.field2source == slow.field2source
    assert fast.field2seqlen == slow.field2seqlen
    for name in ("inter_feat", "user_feat", "item_feat"):
        a, b = getattr(slow, name), getattr(fast, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
            continue
        assert list(a.columns) == list(b.columns), name
        for column in a.columns:
            x, y = a[column], b[column]
            assert x.dtype == y.dtype, (name, column)
            assert torch.equal(torch.nan_to_num(x, nan=-123.0), torch.nan_to_num(y, nan=-123.0)), (name, column)


@pytest.fixture()
def fast_reads(monkeypatch) -> list:
    """Files read by the fast path (a spy, so tests can tell it from the fallback)."""
    seen = []
    real = fast_loader._read_table

    def spy(filepath, *args):
        seen.append(str(filepath))
        return real(filepath, *args)

    monkeypatch.setattr(fast_loader, "_read_table", spy)
    return seen


def config_for(data_path, dataset: str, **overrides) -> Config:
    settings = {"data_path": str(data_path), "state": "WARNING", "show_progress": False,
                "gpu_id": "", "train_neg_sample_args": None}
    settings.update(overrides)
    return Config(model="SASRec", dataset=dataset, config_dict=settings)


def test_ml100k_dataset_is_identical(fast_reads):
    config = Config(model="SASRec", dataset="ml-100k",
                    config_dict={"state": "WARNING", "show_progress": False, "gpu_id": "",
                                 "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                                              "user": ["user_id", "age", "gender", "occupation"],
                                              "item": ["item_id", "release_year", "class"]},
                                 "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)"})
    slow = SequentialDataset(config)
    assert fast_reads == []
    fast = FastSequentialDataset(config)
    assert [p.rsplit(".", 1)[1] for p in fast_reads] == ["inter", "user"]  # ml-100k.item has a token_seq column
    assert fast.inter_num == slow.inter_num > 90000
    assert_same_dataset(slow, fast)


def tricky_rows(seed: int = 0, n: int = 3000) -> list[tuple]:
    """Tokens that differ only as strings, pandas NA spellings, odd floats, and Zipf items."""
    rng = np.random.default_rng(seed)
    users = ["7", "007", "u1", "a b", "é", "-1", "1.0", "x", "True"]
    items = [str(i) for i in range(1, 40)] + ["040", "0", "00"]
    tags = ["NA", "null", "", "None", "nan", "v", "N/A", "#N/A", "<NA>", "w"]
    p = 1.0 / np.arange(1, len(items) + 1)
    rows = []
    for k in range(n):
        u = users[rng.integers(len(users))]
        i = items[rng.choice(len(items), p=p / p.sum())]
        ts = rng.choice(["1e3", str(k), "12.5", "", "inf", "NaN", "+3", "-7.25"], p=[.1, .7, .05, .05, .02, .03, .03, .02])
        rows.append((u, i, ts, rng.choice(["1", "2", "3.5", "", "NA"]), tags[rng.integers(len(tags))]))
    return rows


HEADER = "user_id:token\titem_id:token\ttimestamp:float\trating:float\ttag:token"
COLUMNS = ["user_id", "item_id", "timestamp", "rating", "tag"]


@pytest.mark.parametrize("dataset_cls, fast_cls", [(Dataset, FastDataset), (SequentialDataset, FastSequentialDataset)])
def test_generated_file_with_tricky_tokens_is_identical(tmp_path, dataset_cls, fast_cls, fast_reads):
    write_inter(tmp_path / "tricky" / "tricky.inter", tricky_rows(), header=HEADER)
    config = config_for(tmp_path, "tricky", load_col={"inter": COLUMNS},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    slow, fast = dataset_cls(config), fast_cls(config)
    assert len(fast_reads) == 1
    assert slow.inter_num == 3000 and len(slow.field2id_token["user_id"]) == 10
    assert_same_dataset(slow, fast)


def test_raw_frames_are_identical_including_nan_and_leading_zeros(tmp_path, fast_reads):
    path = write_inter(tmp_path / "t" / "t.inter", tricky_rows(seed=1, n=3000), header=HEADER)
    config = config_for(tmp_path, "t", load_col={"inter": COLUMNS},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    fast = FastDataset(config)
    a = Dataset._load_feat(fast, str(path), "inter")
    b = fast._load_feat(str(path), "inter")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert fast_reads == [str(path)] * 2
    assert b["tag"].isna().sum() > 100 and set(b["tag"].dropna()) == {"v", "w"}
    assert {"007", "7"} <= set(b["user_id"]) and {"0", "00"} <= set(b["item_id"])
    assert np.isinf(b["timestamp"]).any() and b["rating"].isna().any()


def test_token_seq_columns_and_quotes_fall_back_to_recbole(tmp_path, caplog):
    header = "user_id:token\titem_id:token\ttimestamp:float\ttags:token_seq"
    rows = [(u, i, t, "a b" if t % 2 else "") for t, (u, i) in enumerate([(1, 2), (1, 3), (2, 2), (2, 3), (3, 3)])]
    write_inter(tmp_path / "s" / "s.inter", rows + [('"4"', 2, 9, "c")], header=header)
    config = config_for(tmp_path, "s", load_col={"inter": ["user_id", "item_id", "timestamp", "tags"]},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    with caplog.at_level(logging.DEBUG):
        fast = FastDataset(config)
    assert any("token_seq" in r.getMessage() for r in caplog.records)
    assert_same_dataset(Dataset(config), fast)
    config = config_for(tmp_path, "s", load_col={"inter": ["user_id", "item_id", "timestamp"]},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    with caplog.at_level(logging.DEBUG):
        fast = FastDataset(config)
    assert any("quote" in r.getMessage() for r in caplog.records)
    assert_same_dataset(Dataset(config), fast)
    assert "4" in fast.field2token_id["user_id"]  # pandas unquotes "4"; so does the fallback


def test_ragged_rows_fall_back_and_behave_as_recbole(tmp_path):
    path = tmp_path / "r" / "r.inter"
    path.parent.mkdir(parents=True)
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\n2\t2\t5\n")
    config = config_for(tmp_path, "r", load_col={"inter": ["user_id", "item_id", "timestamp"]},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    a = Dataset._load_feat(Dataset(config), str(path), "inter")
    b = FastDataset(config)._load_feat(str(path), "inter")
    pd.testing.assert_frame_equal(a, b)


def test_fast_loader_false_uses_recbole_reader(tmp_path, monkeypatch):
    write_inter(tmp_path / "f" / "f.inter", [(1, 2, 3), (1, 3, 4), (2, 2, 5)])
    config = config_for(tmp_path, "f", fast_loader=False, load_col={"inter": ["user_id", "item_id", "timestamp"]},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    monkeypatch.setattr(FastLoadMixin, "_load_feat_fast", lambda *a: pytest.fail("fast path used"))
    assert FastDataset(config).inter_num == 3


def test_header_only_file_gives_an_empty_frame_like_recbole(tmp_path, fast_reads):
    path = write_inter(tmp_path / "e" / "e.inter", [(1, 2, 3)])
    config = config_for(tmp_path, "e", load_col={"inter": ["user_id", "item_id", "timestamp"]},
                        user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    fast = FastDataset(config)
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    pd.testing.assert_frame_equal(Dataset._load_feat(fast, str(path), "inter"), fast._load_feat(str(path), "inter"))
    assert len(fast_reads) == 2


def test_converted_tianchi_log_loads_with_its_dataset_config(tmp_path, fast_reads):
    """convert -> dataset_configs/tianchi.yaml -> the same SequentialDataset from both readers."""
    from recbole_popprior.converters.pipeline import convert

    rng = np.random.default_rng(3)
    lines = []
    for u in range(1, 41):
        for _ in range(int(rng.integers(3, 15))):
            item = int(np.floor(np.exp(rng.random() * np.log(60))))
            lines.append(f"{u},{item},{item % 5},pv,{1511539200 + int(rng.integers(0, 777600))}")
    src = tmp_path / "UserBehavior.csv"
    src.write_text("\n".join(lines) + "\n")
    convert("tianchi", src, tmp_path / "data", progress=False)
    config = Config(model="SASRec", dataset="tianchi",
                    config_dict={"data_path": str(tmp_path / "data"), "gpu_id": "", "state": "WARNING"})
    assert config["MAX_ITEM_LIST_LENGTH"] == 50 and config["eval_args"]["order"] == "TO"
    slow, fast = SequentialDataset(config), FastSequentialDataset(config)
    assert len(fast_reads) == 1 and fast.inter_num == slow.inter_num > 0
    assert set(fast.inter_feat.columns) == {"user_id", "item_id", "timestamp"}
    assert_same_dataset(slow, fast)
