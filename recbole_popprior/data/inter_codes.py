"""The ``.inter`` atomic file as integer codes, without one Python object per row (DESIGN.md §5.1).

RecBole reads every token cell into a Python string (about 60 bytes a cell, 100M rows: tens of
GB). Here pyarrow dictionary-encodes token columns while parsing: a column becomes an ``int32``
code per row plus one vocabulary of distinct strings, shared by all rows. Header and parse
options are the fast loader's (:func:`~recbole_popprior.data.fast_loader.read_header`), so cells
mean what RecBole's reader makes of them: the same tokens (never re-typed), pandas' default NA
strings as missing; anything doubtful raises ``_Unsupported``. Rows without the header's width
are read as pandas reads them (:mod:`~recbole_popprior.data.row_shapes`): :attr:`InterCodes.shapes`
says which, for the caller's one warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from recbole.utils import FeatureType

from recbole_popprior.data.fast_loader import _Unsupported, csv_options, read_header
from recbole_popprior.data.row_shapes import Normalised, RowShapes, scan_rows

MISSING = -1
"""The code of a missing token cell."""


@dataclass
class InterCodes:
    """Loaded ``.inter`` columns in file order.

    Attributes:
        fields: ``(field, FeatureType)`` of the loaded columns, in header order.
        columns: token field -> ``int32`` codes (``MISSING`` where empty); float field -> ``float64``
            (NaN where empty).
        vocab: token field -> object array of ``str``; code ``c`` is the token ``vocab[c]``.
    """

    fields: list[tuple[str, FeatureType]]
    columns: dict[str, np.ndarray]
    vocab: dict[str, np.ndarray]
    shapes: RowShapes | None = None  #: set when some row did not have the header's width

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def keep(self, rows: np.ndarray) -> None:
        """Keep the rows where the boolean mask ``rows`` is true (in place, file order kept)."""
        if rows.all():
            return
        for field in self.columns:
            self.columns[field] = self.columns[field][rows]


def read_inter_codes(filepath, load_col: set | None, unload_col: set | None, separator: str,
                     encoding: str | None, block_size: int = 4 << 20) -> InterCodes:
    """Read the columns RecBole would load from ``filepath``; raises ``_Unsupported`` where the
    result could differ from RecBole's reader (see :mod:`~recbole_popprior.data.fast_loader`).

    The file is read block by block, each block's values copied at once into one buffer per
    column (sized from the first block; pages past the end are never touched). A whole-file
    pyarrow table, or a list of per-block arrays, would leave freed memory between the kept
    columns that the allocators do not give back: about 30 bytes a row at 10M rows.
    """
    names, fields = read_header(filepath, load_col, unload_col, separator, encoding)
    if not fields:
        raise _Unsupported("no column to load")
    size = os.path.getsize(filepath)
    try:
        return _read(_open(filepath, names, fields, separator, block_size), fields, size, block_size)
    except _Unsupported as why:
        if not str(why).startswith("CSV parse error: Expected"):  # pyarrow: "Expected 4 columns, got 5"
            raise
    shapes = scan_rows(filepath, separator, len(names))
    if shapes is None or shapes.quoted or shapes.drop_first:
        raise _Unsupported("rows without the header's fields, where pandas' reading is not followed here")
    skipped = [f"_index{k}" for k in range(shapes.shift)]  # pandas' implicit index: fields before the columns
    codes = _read(_open(Normalised(filepath, separator, shapes), skipped + names, fields, separator, block_size,
                        skip_rows=0), fields, size, block_size)
    codes.shapes = shapes
    return codes


def _read(reader: pcsv.CSVStreamingReader, fields: list, size: int, block_size: int) -> InterCodes:
    columns: dict[str, _Buffer] = {}
    vocabularies = {field: _Vocabulary() for field, _, ftype in fields if ftype == FeatureType.TOKEN}
    try:
        for batch in reader:
            if not columns:
                rows = len(batch) * (size / block_size * 1.05 + 1)
                columns = {field: _Buffer(np.int32 if ftype == FeatureType.TOKEN else np.float64, int(rows))
                           for field, _, ftype in fields}
            for field, field_type, ftype in fields:
                column = batch.column(field_type)
                if ftype == FeatureType.TOKEN:
                    columns[field].append(vocabularies[field].add(column))
                else:
                    columns[field].append(column.to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        raise _Unsupported(str(exc).splitlines()[0]) from None
    if not columns:
        raise _Unsupported("no rows")
    arrays = {field: columns[field].array() for field, _, _ in fields}
    vocab = {field: vocabulary.recode(arrays[field]) for field, vocabulary in vocabularies.items()}
    return InterCodes([(f, t) for f, _, t in fields], arrays, vocab)


class _Buffer:
    """A growing array: appends are copies into one allocation."""

    def __init__(self, dtype, capacity: int):
        self.data = np.empty(max(capacity, 1), dtype=dtype)
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):  # only when the first block under-estimated the file's rows
            bigger = np.empty(max(end, len(self.data) * 3 // 2), dtype=self.data.dtype)
            bigger[:self.size] = self.data[:self.size]
            self.data = bigger
        self.data[self.size:end] = values
        self.size = end

    def array(self) -> np.ndarray:
        return self.data[:self.size]


def _open(source, names: list[str], fields: list, separator: str, block_size: int,
          skip_rows: int = 1) -> pcsv.CSVStreamingReader:
    """pyarrow's streaming CSV reader with the fast loader's options (tokens dictionary-encoded)."""
    try:  # open_csv already parses the first block
        return pcsv.open_csv(source, **csv_options(names, fields, separator, block_size, skip_rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        raise _Unsupported(str(exc).splitlines()[0]) from None


class _Vocabulary:
    """One code per distinct token over the whole file, in order of first appearance.

    pyarrow encodes each block with a dictionary of its own. The blocks' indices are kept as
    they are; at the end the blocks' dictionaries (their distinct tokens, not their rows) are
    encoded together, and each block's indices translated in place.
    """

    def __init__(self):
        self._dictionaries: list[pa.Array] = []
        self._blocks: list[int] = []

    def add(self, column: pa.DictionaryArray) -> np.ndarray:
        """The block's own indices (``MISSING`` where empty), to be translated by :meth:`recode`."""
        tokens = column.dictionary
        if len(tokens) and pc.any(pc.starts_with(tokens, '"')).as_py():
            raise _Unsupported("a token starts with a quote character")  # pandas reads it as a quoted field
        self._dictionaries.append(tokens)
        self._blocks.append(len(column))
        return column.indices.fill_null(MISSING).to_numpy(zero_copy_only=False)

    def recode(self, codes: np.ndarray) -> np.ndarray:
        """Translate ``codes`` (the blocks' indices, block after block) in place; return the vocabulary."""
        encoded = pc.dictionary_encode(pa.concat_arrays(self._dictionaries)) if self._dictionaries else None
        if encoded is None:
            return np.empty(0, dtype=object)
        code_of_entry = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        start = entry = 0
        for tokens, block in zip(self._dictionaries, self._blocks):
            local = np.append(code_of_entry[entry:entry + len(tokens)], np.int32(MISSING))  # index -1 reads MISSING
            codes[start:start + block] = local[codes[start:start + block]]
            start, entry = start + block, entry + len(tokens)
        vocab = np.empty(len(encoded.dictionary), dtype=object)
        vocab[:] = encoded.dictionary.to_pylist()
        self._dictionaries, self._blocks = [], []
        return vocab
