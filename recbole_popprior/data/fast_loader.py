"""A fast path for RecBole's atomic-file reader (DESIGN.md §5; issue 4).

RecBole 1.2.1 reads every atomic file with ``pd.read_csv(engine="python")`` and one Python
string per token cell: about 0.39M rows/s and 360 bytes/row. :class:`FastLoadMixin` reads
``token`` and ``float`` columns with pyarrow's multi-threaded CSV reader instead; tokens are
dictionary-encoded while parsing, so each distinct token becomes one shared Python string.

The result is the DataFrame RecBole's ``_load_feat`` would return: the same columns in the
same order, token cells as ``str`` (never re-typed: ``"007"`` stays ``"007"``), pandas'
default NA strings as NaN, float columns as float64, and the same ``field2type`` /
``field2source`` / ``field2seqlen`` / ``field2bucketnum`` entries. Anything the fast path does
not handle exactly (sequence columns, encodings other than UTF-8, a field that starts with a
quote, rows without the header's width, numbers pandas reads but pyarrow does not) falls back
to RecBole's own code.
"""

from __future__ import annotations

import codecs
import locale
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
from pandas._libs.parsers import STR_NA_VALUES
from recbole.utils import FeatureSource, FeatureType

from recbole_popprior.data.row_shapes import header_line

_NA_VALUES = sorted(STR_NA_VALUES)  # what pandas' read_csv turns into NaN by default
_TOKEN = pa.dictionary(pa.int32(), pa.string())


class _Unsupported(Exception):
    """The fast path cannot promise RecBole's exact result for this file."""


class FastLoadMixin:
    """Overrides ``Dataset._load_feat`` with a pyarrow fast path; ``fast_loader: False`` turns it off."""

    def _load_feat(self, filepath, source):
        if self.config["fast_loader"] is False:
            return super()._load_feat(filepath, source)
        try:
            return self._load_feat_fast(filepath, source)
        except _Unsupported as why:
            logging.getLogger().debug(f"fast loader: {filepath}: {why}; using RecBole's reader")
            return super()._load_feat(filepath, source)

    def _load_feat_fast(self, filepath, source) -> pd.DataFrame | None:
        load_col, unload_col = self._get_load_and_unload_col(source)
        if load_col == set():
            return None
        separator = self.config["field_separator"]
        names, fields = read_header(filepath, load_col, unload_col, separator, self.config["encoding"])
        if not fields:
            return super()._load_feat(filepath, source)  # RecBole warns and returns None
        table = _read_table(filepath, names, fields, separator)

        for field, _, ftype in fields:  # the bookkeeping RecBole's _load_feat does
            if isinstance(source, FeatureSource) or source != "link":
                self.field2source[field] = source
                self.field2type[field] = ftype
                self.field2seqlen[field] = 1
                if ftype == FeatureType.FLOAT:
                    self.field2bucketnum[field] = 2
        data = {}
        for field, field_type, ftype in fields:
            column = table.column(field_type)
            data[field] = _tokens(column) if ftype == FeatureType.TOKEN else _floats(column)
        return pd.DataFrame(data, index=pd.RangeIndex(table.num_rows), copy=False)  # arrays are ours: no copy


def read_header(filepath, load_col: set | None, unload_col: set | None, separator, encoding
                ) -> tuple[list[str], list[tuple[str, str, FeatureType]]]:
    """The header's column names and the ``(field, "field:type", FeatureType)`` RecBole would load.

    Raises :class:`_Unsupported` where pyarrow cannot promise RecBole's result: encodings other
    than UTF-8, unusual separators or headers, and ``token_seq`` / ``float_seq`` columns to load.
    """
    if encoding is None:  # RecBole opens the header with the locale's encoding, pandas reads UTF-8
        encoding = locale.getpreferredencoding(False)
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except (LookupError, TypeError):
        utf8 = False
    if not utf8 or not isinstance(separator, str) or len(separator) != 1 or separator in "\"\r\n":
        raise _Unsupported("encoding or separator")
    head_bytes, _ = header_line(filepath)
    try:
        head = head_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unsupported("header is not UTF-8") from None
    names = head.split(separator)
    if head.startswith("\ufeff") or "\r" in head or len(names) < 2 or len(set(names)) != len(names):
        raise _Unsupported("unusual header")
    fields = []  # (field, "field:type", FeatureType) of the columns to load
    for field_type in names:
        parts = field_type.split(":")
        if len(parts) != 2:
            raise _Unsupported("unusual header")
        field, ftype = parts
        try:
            ftype = FeatureType(ftype)
        except ValueError:
            raise _Unsupported("unknown type") from None  # RecBole raises its own error
        if ftype not in (FeatureType.TOKEN, FeatureType.FLOAT):
            if (load_col is None or field in load_col) and not (unload_col and field in unload_col):
                raise _Unsupported(f"{ftype.value} column {field}")
        if load_col is not None and field not in load_col:
            continue
        if unload_col is not None and field in unload_col:
            continue
        fields.append((field, field_type, ftype))
    return names, fields


def csv_options(names: list[str], fields: list, separator: str, block_size: int = 16 << 20,
                skip_rows: int = 1) -> dict[str, object]:
    """pyarrow's read, parse and convert options as pandas' python parser reads an atomic file:
    no quoting, tokens dictionary-encoded, pandas' default NA strings; keywords of ``read_csv``
    and ``open_csv`` alike."""
    types = {field_type: (_TOKEN if ftype == FeatureType.TOKEN else pa.float64()) for _, field_type, ftype in fields}
    return {
        "read_options": pcsv.ReadOptions(column_names=names, skip_rows=skip_rows, block_size=block_size),
        "parse_options": pcsv.ParseOptions(delimiter=separator, quote_char=False, double_quote=False,
                                           escape_char=False, newlines_in_values=False, ignore_empty_lines=True),
        "convert_options": pcsv.ConvertOptions(column_types=types, include_columns=[f[1] for f in fields],
                                               null_values=_NA_VALUES, strings_can_be_null=True,
                                               quoted_strings_can_be_null=True, check_utf8=True),
    }


def _read_table(filepath, names: list[str], fields: list, separator: str, memory_pool=None) -> pa.Table:
    """Parse the file body with pyarrow; any doubt raises :class:`_Unsupported`."""
    try:
        table = pcsv.read_csv(filepath, memory_pool=memory_pool, **csv_options(names, fields, separator))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        raise _Unsupported(str(exc).splitlines()[0]) from None
    for _, field_type, ftype in fields:  # pandas reads a field that starts with a quote as quoted
        if ftype == FeatureType.TOKEN:
            for chunk in table.column(field_type).chunks:
                if any(token.startswith('"') for token in chunk.dictionary.to_pylist()):
                    raise _Unsupported("a token starts with a quote character")
    return table


def _tokens(column: pa.ChunkedArray) -> np.ndarray:
    """Object array of str (NaN where missing), one Python string per distinct token per chunk."""
    out = np.empty(len(column), dtype=object)
    start = 0
    for chunk in column.chunks:
        end = start + len(chunk)
        values = np.array(chunk.dictionary.to_pylist() + [np.nan], dtype=object)
        indices = chunk.indices.fill_null(len(chunk.dictionary)).to_numpy()
        out[start:end] = values[indices]
        start = end
    return out


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """float64 with NaN where missing."""
    if len(column) == 0:
        return np.zeros(0, np.float64)
    return np.asarray(column.to_numpy(), dtype=np.float64)
