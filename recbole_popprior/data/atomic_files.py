"""Malformed atomic files as one line naming the file and the row (DESIGN.md §5, issue 14).

RecBole's reader (``Dataset._load_feat``: ``pd.read_csv(engine="python")``) fails on a bad
file with messages about its internals ("too many values to unpack", "Unable to convert
column ...") or, for a ragged row, not at all: pandas pads a short row with NaN and shifts a
long one into the index, and the run fails later with an unrelated error. Here:

- :func:`check_header` reads the ``name:type`` header (one line, before any reader runs);
- :class:`AtomicFileGuard`, the outermost ``_load_feat``, checks the header and refuses an
  ``.inter`` file without data rows;
- :class:`RecBoleReaderGuard` sits right above RecBole's reader (below the fast loader, which
  falls back to it): it looks for ragged rows first (:func:`first_ragged_row`, a vectorised pass
  over the bytes) and turns the reader's ``ValueError`` into one line (with the first cell that
  is not a number, :func:`first_bad_number`).

Rows holding a quote character are not judged: pandas reads quoted cells (with separators
inside) that a byte count cannot.
"""

from __future__ import annotations

import locale
import os
from typing import Iterator

import numpy as np
from pandas._libs.parsers import STR_NA_VALUES
from recbole.utils import FeatureSource, FeatureType

from recbole_popprior.errors import PopPriorError

_TYPES = ", ".join(t.value for t in FeatureType)
_BLOCK = 16 << 20


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_header(filepath: str, separator: str, encoding: str | None) -> list[tuple[str, FeatureType]]:
    """The ``(name, type)`` columns of an atomic file's header, or one :class:`PopPriorError` line
    for what RecBole's reader would trip on: an empty file, a header that is not text in
    ``encoding``, a column that is not ``name:type``, a type RecBole does not know."""
    name = os.path.basename(filepath)
    with open(filepath, "rb") as handle:
        raw = handle.readline()
    if not raw:
        raise PopPriorError(f"{filepath} is empty: an atomic file starts with a header line of name:type columns")
    try:
        head = raw.decode(encoding or locale.getpreferredencoding(False))
    except (UnicodeDecodeError, LookupError) as exc:
        raise PopPriorError(f"{filepath}: the header is not {encoding or 'locale'}-encoded text ({exc.reason}); "
                            "set encoding to the file's encoding") from None
    head = head[:-1] if head.endswith("\n") else head  # RecBole's readline()[:-1]
    if head.endswith("\r"):
        raise PopPriorError(f"{filepath} has Windows line ends (\\r\\n); RecBole reads \\n only")
    columns = head.split(separator)
    fields = []
    for column in columns:
        parts = column.split(":")
        if len(parts) != 2 or not parts[0]:
            hint = ""
            if len(columns) == 1 and any(c in head for c in ",; |"):
                hint = (f"; is the file separated by field_separator {separator!r}? RecBole atomic files "
                        "are tab-separated")
            raise PopPriorError(f"{name}: header column {_show(column)} is not name:type{hint}")
        try:
            fields.append((parts[0], FeatureType(parts[1])))
        except ValueError:
            raise PopPriorError(f"{name}: column {parts[0]!r} has unknown type {parts[1]!r} "
                                f"(RecBole's types: {_TYPES})") from None
    return fields


def _lines(filepath: str) -> Iterator[tuple[int, np.ndarray]]:
    """The file after its header as blocks of whole lines: ``(number of the block's first line,
    its bytes as uint8)``; a last line without ``\\n`` gets one."""
    with open(filepath, "rb") as handle:
        handle.readline()
        line, carry = 2, b""
        while True:
            chunk = handle.read(_BLOCK)
            if chunk:
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                body, carry = data[:cut], data[cut:]
            else:
                body, carry = (carry + b"\n" if carry else b""), b""
            if body:
                block = np.frombuffer(body, np.uint8)
                yield line, block
                line += int(np.count_nonzero(block == 10))
            if not chunk:
                return


def first_ragged_row(filepath: str, separator: str, n_columns: int) -> tuple[int, int, str] | None:
    """``(line number, fields, line)`` of the first non-empty row without ``n_columns`` fields,
    or ``None`` (rows with a quote character are skipped; a separator of several characters
    is not checked)."""
    sep = separator.encode()
    if len(sep) != 1:
        return None
    for first_line, block in _lines(filepath):
        ends = np.flatnonzero(block == 10)
        starts = np.concatenate(([0], ends[:-1] + 1))
        seps = np.flatnonzero(block == sep[0])
        fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
        empty = (ends - starts == 0) | ((ends - starts == 1) & (block[np.maximum(ends - 1, 0)] == 13))
        for k in np.flatnonzero((fields != n_columns) & ~empty):
            text = block[starts[k]:ends[k]].tobytes().decode("utf-8", "replace")
            if '"' not in text:
                return first_line + int(k), int(fields[k]), text
    return None


def first_bad_number(filepath: str, separator: str, encoding: str | None, columns: list[str],
                     wanted: set[str]) -> tuple[int, str, str] | None:
    """``(line number, column, cell)`` of the first cell of a ``float`` column in ``wanted`` that
    Python cannot read as a number (pandas' NA strings and empty cells are missing values)."""
    index = [k for k, column in enumerate(columns) if column in wanted]
    with open(filepath, encoding=encoding or locale.getpreferredencoding(False), errors="replace") as handle:
        handle.readline()
        for number, line in enumerate(handle, start=2):
            cells = line.rstrip("\n").split(separator)
            for k in index:
                cell = cells[k] if k < len(cells) else ""
                if cell.strip() in STR_NA_VALUES or not cell.strip():
                    continue
                try:
                    float(cell)
                except ValueError:
                    return number, columns[k], cell
    return None


def ragged_message(filepath: str, separator: str, n_columns: int) -> str | None:
    """The one line for the file's first ragged row, or ``None`` when every row has the header's width."""
    ragged = first_ragged_row(filepath, separator, n_columns)
    if ragged is None:
        return None
    line, count, text = ragged
    return (f"{os.path.basename(filepath)} line {line}: {count} fields where the header has {n_columns} "
            f"({_show(text)}); the separator is field_separator {separator!r}")


def bad_number_message(filepath: str, separator: str, encoding: str | None,
                       fields: list[tuple[str, FeatureType]]) -> str | None:
    """The one line for the file's first ``float`` cell that is not a number, or ``None``."""
    columns = [field for field, _ in fields]
    floats = {field for field, ftype in fields if ftype == FeatureType.FLOAT}
    bad = first_bad_number(filepath, separator, encoding, columns, floats) if floats else None
    if bad is None:
        return None
    line, column, cell = bad
    return f"{os.path.basename(filepath)} line {line}: column {column} holds floats, got {_show(cell)}"


class AtomicFileGuard:
    """Outermost ``_load_feat``: the header is checked before any reader runs, and an ``.inter``
    file without data rows is refused (RecBole would only say, after filtering, that "some feat
    is empty")."""

    def _load_feat(self, filepath, source):
        check_header(filepath, self.config["field_separator"], self.config["encoding"])
        feat = super()._load_feat(filepath, source)
        if source == FeatureSource.INTERACTION and feat is not None and len(feat) == 0:
            raise PopPriorError(no_rows_message(filepath))
        return feat


class RecBoleReaderGuard:
    """Right above RecBole's ``_load_feat`` (below the fast loader, which falls back to it): ragged
    rows are looked for before it reads, and its ``ValueError`` becomes one line naming the file,
    the line and the cell."""

    def _load_feat(self, filepath, source):
        separator, encoding = self.config["field_separator"], self.config["encoding"]
        fields = check_header(filepath, separator, encoding)
        message = ragged_message(filepath, separator, len(fields))
        if message:
            raise PopPriorError(message)
        try:
            return super()._load_feat(filepath, source)
        except ValueError as exc:  # pandas' parse and conversion errors (UnicodeDecodeError too)
            message = None if isinstance(exc, UnicodeDecodeError) else bad_number_message(
                filepath, separator, encoding, fields)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PopPriorError(message or f"cannot read {os.path.basename(filepath)}: {reason}") from None


def no_rows_message(filepath: str) -> str:
    return f"{os.path.basename(filepath)} has a header but no data rows"
