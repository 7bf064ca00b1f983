"""Every atomic file RecBole 1.2.1 reads, the plugin reads with the same rows and values (issue 19, 1).

A differential test: RecBole's own ``Dataset._load_feat`` (pandas' python parser) on a table of
quirky files is the reference for the plugin's two readers, the dataset class every model gets
(:func:`recbole_popprior.data.dataset.dataset_class`: the fast loader, falling back to RecBole's
reader) and the lean path's ``.inter`` reader (``LeanSequentialDataset._load_inter_feat``, pyarrow).
Where pandas silently truncates, pads or skips rows, each plugin reader logs exactly one WARNING
with the count and the first line; where it reads nothing odd, none. Files RecBole cannot read
are one ``PopPriorError`` line from both.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from recbole.data.dataset import Dataset
from recbole.utils import FeatureSource, FeatureType

from recbole_popprior.data.dataset import _loader_class
from recbole_popprior.data.fast_loader import _Unsupported
from recbole_popprior.data.inter_codes import MISSING
from recbole_popprior.data.lean_dataset import LeanSequentialDataset
from recbole_popprior.data.row_shapes import scan_rows
from recbole_popprior.errors import PopPriorError

from test_sequences import Both, assert_same_data

H4 = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ROWS = "".join(f"{u}\t{u % 3 + 1}\t{u % 5}\t{880000000 + 37 * u}\n" for u in range(1, 8))
#: name -> (file bytes, load_col of .inter (None: every column), (irregular rows, first line) or None)
QUIRKS = {
    "regular": ((H4 + "\n" + ROWS).encode(), None, None),
    # RecBole's own tests/test_data/test/test.inter: a 4-field header, one extra trailing field on its
    # last line, and no final newline
    "recbole test.inter": ((H4 + "\n" + ROWS + "130\t121\t5\t876250746\t1").encode(), None, (1, 9)),
    "recbole test.inter, 3 columns loaded": ((H4 + "\n" + ROWS + "130\t121\t5\t876250746\t1").encode(),
                                             ["user_id", "item_id", "timestamp"], (1, 9)),
    "extra fields in the middle": ((H4 + "\n" + ROWS + "8\t2\t3\t880000300\tx\ty\ty\n9\t1\t1\t880000400\n").encode(),
                                   None, (1, 9)),
    "missing trailing fields": ((H4 + "\n" + ROWS + "8\t2\t3\n9\t1\n10\t2\t4\t880000500\n").encode(), None, (2, 9)),
    "a missing id": ((H4 + "\n" + ROWS + "8\n").encode(), None, (1, 9)),
    "longer and shorter rows": ((H4 + "\n" + ROWS + "8\t2\n9\t1\t1\t880000400\t1\n").encode(), None, (2, 9)),
    # pandas takes the first data row's extra field as an index: every row is read shifted (and padded)
    "the first data row is longer": ((H4 + "\n" + "0\t" + ROWS + "8\t1\t2\n").encode(), None, (8, 2)),
    "the first data row is longer, 3 columns loaded": ((H4 + "\n" + "0\t" + ROWS).encode(),
                                                       ["user_id", "item_id", "timestamp"], (7, 2)),
    "no final newline": ((H4 + "\n" + ROWS.rstrip("\n")).encode(), None, None),
    "CRLF line ends": ((H4 + "\n" + ROWS).replace("\n", "\r\n").encode(), None, None),
    "CRLF line ends, a long row": ((H4 + "\n" + ROWS + "8\t2\t3\t880000300\t1\n").replace("\n", "\r\n").encode(),
                                   None, (1, 9)),
    "CR line ends": ((H4 + "\n" + ROWS + "8\t2\n").replace("\n", "\r").encode(), None, (1, 9)),
    "blank lines and white space": ((H4 + "\n\n" + ROWS + "  \n\n\t\t\t\n").encode(), None, (1, 10)),
    "a NUL byte in a token": ((H4 + "\n" + ROWS + "8\t2\x00\t1\t880000300\n").encode(), None, None),
    "NA strings and leading zeros": ((H4 + "\n" + ROWS + "007\tNA\t\t880000300\n7\t02\tnan\tNULL\n").encode(), None, None),
    "a BOM on an unused column": (("\ufeffextra:token\t" + H4 + "\n"
                                   + "".join(f"e{k}\t{line}\n" for k, line in enumerate(ROWS.splitlines()))).encode(),
                                  ["user_id", "item_id", "timestamp"], None),
    "unused columns": (("user_id:token\tnote:token\titem_id:token\tscore:float\ttimestamp:float\n"
                        + "".join(f"{u}\tn o t e\t{u % 3}\tbad\t{880000000 + u}\n" for u in range(1, 8))).encode(),
                       ["user_id", "item_id", "timestamp"], None),
    "an unused column with a quoted tab": (("user_id:token\tnote:token\titem_id:token\ttimestamp:float\n"
                                            + "".join(f'{u}\t"a\tb"\t{u % 3}\t{880000000 + u}\n' for u in range(1, 5))
                                            ).encode(), ["user_id", "item_id", "timestamp"], None),
    "quoted tokens": ((H4 + "\n" + ROWS + '"8"\t"a\tb"\t1\t880000300\n9\t2"x\t1\t880000400\n').encode(), None, None),
    "empty token_seq cells": (("user_id:token\titem_id:token\ttimestamp:float\ttags:token_seq\n"
                               + "".join(f"{u}\t{u % 3}\t{880000000 + u}\t{'a b' if u % 2 else ''}\n"
                                         for u in range(1, 8))).encode(), None, None),
    "a float_seq column": (("user_id:token\titem_id:token\ttimestamp:float\tvec:float_seq\n"
                            + "".join(f"{u}\t{u % 3}\t{880000000 + u}\t{'0.5 1.5' if u % 3 else ''}\n"
                                      for u in range(1, 8))).encode(), None, None),
}
#: what RecBole cannot read: name -> (file bytes, load_col, words of the one line)
UNREADABLE = {
    "a float that is not a number": ((H4 + "\n" + ROWS + "8\t2\tabc\t880000300\n").encode(), None,
                                     ("line 9", "rating", "'abc'")),
    "a shifted float that is not a number": ((H4 + "\n0\t" + ROWS + "x\t8\t2\t3\tabc\n").encode(), None,
                                             ("line 9", "timestamp", "'abc'")),
    "a BOM on the user id": (("\ufeff" + H4 + "\n" + ROWS).encode(), None, ("byte-order mark",)),
    "an unclosed quote": ((H4 + "\n" + ROWS + '8\t"2\t3\t4\n').encode(), None, ("cannot read",)),
}


def _load_col(columns):
    return None if columns is None else {"inter": columns}


def _fake(cls, load_col, dataset_path=None):
    """An instance of a dataset class with just what ``_load_feat`` reads (no data loaded yet)."""
    ds = object.__new__(cls)
    ds.config = {"load_col": load_col, "unload_col": None, "field_separator": "\t", "encoding": "utf-8",
                 "seq_separator": " ", "seq_len": None, "fast_loader": True,
                 "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp"}
    ds.logger = logging.getLogger()
    ds.field2source, ds.field2type, ds.field2seqlen, ds.field2bucketnum = {}, {}, {}, {}
    ds.uid_field, ds.iid_field, ds.time_field = "user_id", "item_id", "timestamp"
    return ds


def recbole_frame(path, load_col) -> tuple[pd.DataFrame, dict]:
    ds = _fake(Dataset, _load_col(load_col))
    frame = Dataset._load_feat(ds, str(path), FeatureSource.INTERACTION)
    return frame, ds.field2type


def plugin_frame(path, load_col) -> tuple[pd.DataFrame, dict]:
    ds = _fake(_loader_class(Dataset, True), _load_col(load_col))
    return ds._load_feat(str(path), FeatureSource.INTERACTION), ds.field2type


def lean_frame(path, load_col) -> tuple[pd.DataFrame, dict] | None:
    """The lean reader's codes as RecBole's frame (tokens back to strings), or None when it leaves the
    file to RecBole's class (``_Unsupported``: ``create_dataset`` then uses RecBole's own path)."""
    ds = _fake(LeanSequentialDataset, _load_col(load_col))
    try:
        LeanSequentialDataset._load_inter_feat(ds, path.stem, str(path.parent))
    except _Unsupported:
        return None
    codes = ds.inter_feat
    data = {}
    for field, ftype in codes.fields:
        values = codes.columns[field]
        if ftype == FeatureType.TOKEN:
            tokens = np.append(codes.vocab[field], np.nan).astype(object)
            values = tokens[np.where(values == MISSING, len(tokens) - 1, values)]
        data[field] = values
    return pd.DataFrame(data), ds.field2type


def assert_same_frame(ref: pd.DataFrame, got: pd.DataFrame) -> None:
    assert list(got.columns) == list(ref.columns) and len(got) == len(ref)
    for column in ref.columns:
        a, b = ref[column].to_numpy(), got[column].to_numpy()
        missing = pd.isna(pd.Series(list(a))).to_numpy()
        assert np.array_equal(missing, pd.isna(pd.Series(list(b))).to_numpy()), column
        for x, y in zip(a[~missing], b[~missing]):
            if isinstance(x, np.ndarray):  # token_seq / float_seq cells
                assert isinstance(y, np.ndarray) and x.tolist() == y.tolist(), column
            else:
                assert type(x) is type(y) and x == y, (column, x, y)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("name", list(QUIRKS))
def test_the_plugin_reads_what_recboles_reader_reads(name, tmp_path, caplog):
    data, load_col, irregular = QUIRKS[name]
    path = tmp_path / "q" / "q.inter"
    path.parent.mkdir()
    path.write_bytes(data)
    ref, ref_types = recbole_frame(path, load_col)
    readers = {"dataset class": plugin_frame}
    if "_seq" not in name:
        readers["lean"] = lean_frame
    for reader, read in readers.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = read(path, load_col)
        lines = _warnings(caplog)
        if got is None:  # the lean reader handed the file to RecBole's class
            assert reader == "lean" and name in ("quoted tokens", "a BOM on an unused column",
                                                 "an unused column with a quoted tab"), name
            continue
        frame, types = got
        assert_same_frame(ref, frame)
        assert types == ref_types
        if irregular is None:
            assert lines == [], (reader, lines)
        else:
            count, line = irregular
            assert len(lines) == 1, (reader, lines)
            assert lines[0].startswith(f"q.inter: {count} row(s) do not have the header's "), (reader, lines)
            assert f"(first at line {line}); as RecBole's reader does, " in lines[0], (reader, lines)


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_files_recbole_cannot_read_are_one_line(name, tmp_path):
    data, load_col, words = UNREADABLE[name]
    path = tmp_path / "q" / "q.inter"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(Exception):  # the reference fails too
        frame, _ = recbole_frame(path, load_col)
        assert "user_id" in frame  # (a BOM: RecBole reads, but without the user id)
    for read in (plugin_frame, lean_frame):
        with pytest.raises(PopPriorError) as caught:
            if read(path, load_col) is None:  # the lean reader hands the file to RecBole's class: plugin_frame
                raise PopPriorError(" ".join(words))
        message = str(caught.value)
        assert "\n" not in message
        for word in words:
            assert word in message, (read.__name__, message)


def test_row_shapes_count_what_pandas_does(tmp_path):
    path = tmp_path / "x.inter"
    path.write_bytes((H4 + "\n1\t2\t3\t4\t5\t6\n1\t2\n \n" + "1\t2\t3\t4\t5\t6\t7\t8\n").encode())
    shapes = scan_rows(str(path), "\t", 4)
    assert (shapes.shift, shapes.first_row, shapes.longer, shapes.shorter, shapes.blank) == (2, 2, [1, 5], [1, 3], [1, 4])
    frame, _ = recbole_frame(path, None)  # the first two fields are pandas' row index
    assert frame.values.tolist()[0] == ["3", "4", 5.0, 6.0] and frame.values.tolist()[2] == ["3", "4", 5.0, 6.0]


def test_recboles_own_test_inter_shape_gives_recboles_batches(tmp_path):
    """The whole lean path on RecBole's test.inter shape equals RecBole's path, batch by batch."""
    rng = np.random.default_rng(0)
    lines = [f"{rng.integers(1, 40)}\t{rng.integers(1, 60)}\t{rng.integers(1, 6)}\t{880000000 + 1000 * k}"
             for k in range(600)]
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test.inter").write_text(H4 + "\n" + "\n".join(lines) + "\n130\t121\t5\t876250746\t1")
    both = Both("GRU4Rec", "test", data_path=str(tmp_path), loss_type="BPR", train_neg_sample_args={
        "distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False, "candidate_num": 0},
        load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
    assert_same_data(both, {"rating_list", "timestamp_list"})
    assert both.lean.dataset.inter_num == both.recbole.dataset.inter_num > 500
    assert "130" in both.lean.dataset.field2token_id["user_id"]  # the last, longer row is read
