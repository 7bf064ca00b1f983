"""Rows whose field count differs from the header's, as RecBole 1.2.1's reader takes them (DESIGN.md §5).

RecBole reads an atomic file with ``pd.read_csv(engine="python", usecols=...)``. For a row
without the header's ``n`` fields, pandas' python parser does not fail, it decides:

- a longer row keeps its first ``n`` fields (``usecols`` drops the rest): RecBole's own
  ``tests/test_data/test/test.inter`` ends with one such row;
- a shorter row is padded with empty (missing) cells;
- a line that is empty, or one field of white space only, is skipped;
- when the *first* data row has ``k`` more fields than the header, its first ``k`` fields are
  taken as the row index, so every row's columns are read ``k`` fields to the right;
- when the second data row has exactly ``n`` more fields than the first, the first data row is
  taken as index names and dropped (:attr:`RowShapes.drop_first`); what pandas then reads is
  not followed here, so the callers leave such a file to RecBole's own reader.

:func:`scan_rows` finds these rows with a vectorised pass over the bytes, and :class:`Normalised`
rewrites them into exactly ``n + k`` fields, so that pyarrow reads what pandas reads.
A field that starts with a quote character could hold separators or line ends (pandas reads
quoted fields, pyarrow here does not): :attr:`RowShapes.quoted` says when one is present, and the
callers then leave the file to RecBole's own reader.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

_BLOCK = 16 << 20
_LF, _CR, _QUOTE = 10, 13, 34


def header_line(filepath: str) -> tuple[bytes, int]:
    """The header's bytes (without its line end) and the offset of the first data line; a line
    ends at ``\\n``, ``\\r\\n`` or ``\\r``, as for pandas and pyarrow."""
    with open(filepath, "rb") as handle:
        head = b""
        while True:
            chunk = handle.read(1 << 16)
            cut = min((i for i in (chunk.find(b"\n"), chunk.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                head += chunk
                if not chunk:
                    return head, len(head)
                continue
            head += chunk[:cut]
            end = len(head) + 1
            if chunk[cut:cut + 2] == b"\r\n":
                end += 1
            elif chunk[cut:cut + 1] == b"\r" and cut + 1 == len(chunk) and handle.read(1) == b"\n":
                end += 1
            return head, end


def _blocks(filepath: str, start: int) -> Iterator[bytes]:
    """The file from ``start`` as blocks of whole lines with ``\\n`` line ends only (``\\r\\n``
    and a lone ``\\r`` become ``\\n``); a last line without its line end gets one."""
    with open(filepath, "rb") as handle:
        handle.seek(start)
        carry = b""
        while True:
            chunk = handle.read(_BLOCK)
            data = carry + chunk
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no \n in 16 MB: a file with \r line ends, or one huge line
                    cut = data.rfind(b"\r") + 1 if data[-1:] != b"\r" else data.rfind(b"\r", 0, len(data) - 1) + 1
                body, carry = data[:cut], data[cut:]
            else:
                body, carry = data, b""
                if body and not body.endswith((b"\n", b"\r")):
                    body += b"\n"
            if b"\r" in body:
                body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if body:
                yield body
            if not chunk:
                return


def _lines_of(block: np.ndarray, sep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end (exclusive, without the ``\\n``) and field count of every line of ``block``."""
    ends = np.flatnonzero(block == _LF)
    starts = np.concatenate(([0], ends[:-1] + 1))
    seps = np.flatnonzero(block == sep)
    fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    return starts, ends, fields


def _is_blank(line: bytes) -> bool:
    """pandas skips a line of one field that is white space only (``str.strip``)."""
    return not line.decode("utf-8", "replace").strip()


@dataclass
class RowShapes:
    """What :func:`scan_rows` found. Counts are data rows; lines are numbered from 1 (the header)."""

    n: int
    shift: int = 0  #: the first data row's extra fields, or the dropped first row's fields
    drop_first: bool = False  #: the first data row is taken as index names and dropped
    first_row: int | None = None  #: line of the first data row
    longer: list[int] = field(default_factory=lambda: [0, 0])  #: [rows, first line]
    shorter: list[int] = field(default_factory=lambda: [0, 0])
    blank: list[int] = field(default_factory=lambda: [0, 0])  #: lines of white space only
    quoted: bool = False  #: some field starts with a quote character

    rows: int = 0  #: data rows (blank lines not counted)

    @property
    def irregular(self) -> bool:
        return bool(self.shift or self.drop_first or self.longer[0] or self.shorter[0] or self.blank[0])

    def message(self, name: str) -> str:
        """One line: how many rows RecBole's reader does not read field for field, the first one's
        line, and what it does with them (the plugin does the same)."""
        if self.shift or self.drop_first:  # every row is read shifted
            total, first = self.rows + self.blank[0], self.first_row
        else:
            total = self.longer[0] + self.shorter[0] + self.blank[0]
            first = min(line for count, line in (self.longer, self.shorter, self.blank) if count)
        width = self.n + self.shift
        parts = []
        if self.drop_first:
            parts.append(f"the first data row (line {self.first_row}) is read as index names and dropped, and "
                         f"each row's first {self.shift} field(s) as its index")
        elif self.shift:
            parts.append(f"the first data row (line {self.first_row}) has {self.shift} field(s) more than the "
                         f"header, so each row's first {self.shift} field(s) are its index and its columns are "
                         f"read {self.shift} field(s) to the right")
        for (count, line), what in ((self.longer, f"have more than {width} fields: the extra ones are ignored"),
                                    (self.shorter, f"have fewer than {width} fields: the missing cells are empty"),
                                    (self.blank, "hold only white space: skipped")):
            if count:
                parts.append(f"{count} row(s) {what} (first at line {line})")
        return (f"{name}: {total} row(s) do not have the header's {self.n} fields (first at line {first}); "
                "as RecBole's reader does, " + "; ".join(parts))


def _count(slot: list[int], line: int, count: int = 1) -> None:
    if count:
        slot[1] = slot[1] or line
        slot[0] += count


def _first_rows(filepath: str, start: int, sep: bytes, count: int = 2) -> list[tuple[int, int]]:
    """``(line, fields)`` of the first ``count`` data rows (blank lines skipped, as pandas does)."""
    found: list[tuple[int, int]] = []
    line_no = 2
    for body in _blocks(filepath, start):
        for text in body.split(b"\n")[:-1]:
            if text and not (sep not in text and _is_blank(text)):
                found.append((line_no, text.count(sep) + 1))
                if len(found) == count:
                    return found
            line_no += 1
    return found


def _odd_lines(fields: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Lines that are not plainly ``width`` fields: another count, or one field (maybe blank)."""
    return np.flatnonzero(((fields != width) | (fields == 1)) & (ends > starts))


def scan_rows(filepath: str, separator: str, n: int) -> RowShapes | None:
    """The file's rows measured against a header of ``n`` fields by pandas' rules (module
    docstring), or ``None`` for a separator that is not one byte (pandas splits on a regular
    expression then, which this does not follow)."""
    sep = separator.encode("utf-8") if isinstance(separator, str) else b""
    if len(sep) != 1 or sep in b"\r\n\"":
        return None
    shapes = RowShapes(n)
    _, start = header_line(filepath)
    first = _first_rows(filepath, start, sep)
    if not first:
        return shapes
    width = _decide(shapes, first)
    line_no = 2  # the header is line 1 (of \n-, \r\n- or \r-ended lines)
    for body in _blocks(filepath, start):
        block = np.frombuffer(body, np.uint8)
        starts, ends, fields = _lines_of(block, sep[0])
        if not shapes.quoted:
            quotes = np.flatnonzero(block == _QUOTE)
            if len(quotes):
                before = block[np.maximum(quotes - 1, 0)]
                shapes.quoted = bool(np.any((quotes == 0) | (before == sep[0]) | (before == _LF)))
        shapes.rows += int(np.count_nonzero(ends > starts))
        for k in _odd_lines(fields, starts, ends, width).tolist():
            number = line_no + k
            if number == shapes.first_row:
                continue  # judged by _decide
            if fields[k] == 1 and _is_blank(body[starts[k]:ends[k]]):
                _count(shapes.blank, number)
                shapes.rows -= 1
            else:
                _judge(shapes, number, int(fields[k]), width)
        line_no += len(ends)
    return _scan_quoted(filepath, sep.decode(), n) if shapes.quoted else shapes


def _scan_quoted(filepath: str, separator: str, n: int) -> RowShapes:
    """:func:`scan_rows` for a file with quoted fields, by the parser pandas' python engine
    uses itself (``csv.reader``: a quoted field may hold separators and line ends). Slow, as
    RecBole's own reader, which such a file is left to."""
    shapes = RowShapes(n, quoted=True)
    records: list[tuple[int, int, bool]] = []  # (first line, fields, blank) of every non-empty record
    with open(filepath, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=separator, quotechar='"', doublequote=True, strict=False)
        next(reader, None)  # the header
        line = reader.line_num + 1
        for record in reader:
            if record:
                records.append((line, len(record), len(record) == 1 and not record[0].strip()))
            line = reader.line_num + 1
    data = [(number, count) for number, count, blank in records if not blank]
    if data:
        width = _decide(shapes, data[:2])
        for number, count in data[1:]:
            _judge(shapes, number, count, width)
    for number, _, blank in records:
        if blank:
            _count(shapes.blank, number)
    shapes.rows = len(data)
    return shapes


def _decide(shapes: RowShapes, first: list[tuple[int, int]]) -> int:
    """pandas' ``_get_index_name`` on the first two data rows: the width every row is read at."""
    (line1, f1), second = first[0], (first[1] if len(first) > 1 else None)
    shapes.first_row = line1
    if second is not None and second[1] == f1 + shapes.n:  # case 0: index names on the first data row
        shapes.drop_first, shapes.shift = True, f1
        return shapes.n + f1
    shapes.shift = max(f1 - shapes.n, 0)  # case 1: an implicit index
    width = shapes.n + shapes.shift
    _judge(shapes, line1, f1, width)
    return width


def _judge(shapes: RowShapes, line: int, fields: int, width: int) -> None:
    if fields > width:
        _count(shapes.longer, line)
    elif fields < width:
        _count(shapes.shorter, line)


class Normalised(io.RawIOBase):
    """The file after its header, each row rewritten to exactly ``shapes.n + shapes.shift`` fields
    and blank lines removed, as pandas reads it: pyarrow's input (not for ``drop_first``)."""

    def __init__(self, filepath: str, separator: str, shapes: RowShapes):
        super().__init__()
        if shapes.drop_first:
            raise ValueError("pandas' reading of a first row taken as index names is not followed")
        self._sep = separator.encode("utf-8")
        self._width = shapes.n + shapes.shift
        _, start = header_line(filepath)
        self._source = _blocks(filepath, start)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._pending):
            body = next(self._source, None)
            if body is None:
                return 0
            self._pending = memoryview(self._rewrite(body))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _rewrite(self, body: bytes) -> bytes:
        block = np.frombuffer(body, np.uint8)
        starts, ends, fields = _lines_of(block, self._sep[0])
        pieces, cursor = [], 0
        for k in _odd_lines(fields, starts, ends, self._width).tolist():
            text = body[starts[k]:ends[k]]
            blank = fields[k] == 1 and _is_blank(text)
            if fields[k] == self._width and not blank:
                continue  # one field, and the width is one: a plain row
            pieces.append(body[cursor:starts[k]])
            cursor = ends[k] + 1
            if not blank:
                cells = text.split(self._sep)[:self._width]
                pieces.append(self._sep.join(cells + [b""] * (self._width - len(cells))) + b"\n")
        if not pieces:
            return body
        pieces.append(body[cursor:])
        return b"".join(pieces)
