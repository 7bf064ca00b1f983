"""Pass 1 of the converters: stream a raw log, validate and filter it in blocks (DESIGN.md §5).

The raw file is cut into blocks of whole lines. Each block is parsed by pyarrow's C++ CSV
reader with typed columns (the fast path). A block that the fast path cannot take as a whole
(a wrong column count, a non-numeric id, an empty line, bytes that are not UTF-8) is parsed
again line by line in Python (the slow path), which skips and counts its bad rows; since bad
rows are rare and bounded by ``max_bad_rows``, so is the slow path.

Rows come out as compact numpy columns (:class:`Block`) in file order, so the position of a
row in the stream is its original line order.
"""

from __future__ import annotations

import gzip
import io
import re
import threading
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from recbole_popprior.converters.layouts import ALIBABA_COLUMNS, BEHAVIORS, TIANCHI_COLUMNS, UTC8, UTC8_OFFSET_S
from recbole_popprior.converters.sample import keep_users
from recbole_popprior.errors import PopPriorError

#: Kinds of row-level problems, as counted in the summary.
BAD_KINDS = ("column_count", "encoding", "bad_id", "bad_time", "unknown_behavior")

_BLOCK_BYTES = 1 << 20
_MAX_LINE_BYTES = 1 << 20


@dataclass
class Block:
    """Valid rows of one block, in file order, plus what was dropped from it."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    ts: np.ndarray  # int64 unix seconds
    behavior: np.ndarray  # int8 code (see BEHAVIORS)
    category: np.ndarray  # int64
    geohash: np.ndarray | None  # int32 id of the raw geohash string (alibaba with dedup only)
    rows: int = 0  # data rows seen in the block (valid + bad)
    blank_lines: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_examples: list = field(default_factory=list)  # (line number, kind, text)
    dropped: Counter = field(default_factory=Counter)  # out_of_window, behavior, sample_users


# ----------------------------------------------------------------------------- input


def open_raw(path: Path) -> tuple[BinaryIO, int, Callable[[], int], bool]:
    """Open a ``.csv``, ``.csv.gz`` or single-member ``.zip`` for binary streaming.

    Returns the stream, the size to report progress against, a function giving the bytes
    consumed so far (compressed bytes for ``.gz``, stored bytes for ``.zip``) and whether the
    file is plain (seekable) csv.
    """
    if not path.exists():
        raise PopPriorError(f"input file not found: {path}")
    if not path.is_file():
        raise PopPriorError(f"input is not a regular file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise PopPriorError(f"input file is empty: {path}")
    try:
        with open(path, "rb") as probe:
            magic = probe.read(4)
        raw = open(path, "rb")
    except OSError as exc:
        raise PopPriorError(f"cannot read input {path}: {exc.strerror}") from None
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), size, raw.tell, False
    if magic == b"PK\x03\x04":
        try:
            archive = zipfile.ZipFile(raw)
        except zipfile.BadZipFile as exc:
            raw.close()
            raise PopPriorError(f"cannot read zip archive {path}: {exc}") from None
        members = [m for m in archive.infolist()
                   if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                   and m.filename.lower().endswith(".csv")]
        if len(members) != 1:
            names = ", ".join(m.filename for m in archive.infolist()) or "nothing"
            raw.close()
            raise PopPriorError(f"zip archive {path} must hold exactly one .csv file, it holds: {names}")
        stream = _CountingReader(archive.open(members[0]))
        return stream, members[0].file_size or 1, stream.tell, False
    return raw, size, raw.tell, True


class _CountingReader(io.RawIOBase):
    """Counts the bytes read through a stream (zip members have no useful ``tell``)."""

    def __init__(self, inner: BinaryIO):
        self._inner, self._n = inner, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._n += len(data)
        return data

    def tell(self) -> int:
        return self._n

    def close(self) -> None:
        self._inner.close()
        super().close()


def iter_chunks(stream: BinaryIO, block_bytes: int = _BLOCK_BYTES) -> Iterator[bytes]:
    """Yield blocks of whole lines (the last one may lack its newline)."""
    rest = b""
    while True:
        try:
            data = stream.read(block_bytes)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise PopPriorError(f"cannot read input (corrupt or truncated archive?): {exc}") from None
        if not data:
            break
        data = rest + data if rest else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            if len(rest) > _MAX_LINE_BYTES:
                raise PopPriorError(f"a line longer than {_MAX_LINE_BYTES >> 20} MiB: the input is not a csv log")
            continue
        rest = data[cut:]
        yield data[:cut]
    if rest:
        yield rest


# ----------------------------------------------------------------------------- time


def parse_time_utc8(text: str, end: bool = False) -> int:
    """``YYYY-MM-DD[ HH[:MM[:SS]]]`` read as UTC+8, or unix seconds, to unix seconds.

    With ``end=True`` a partial time means the end of that period (``2017-12-03`` is
    2017-12-03 23:59:59), so ``--start``/``--end`` given as dates are both inclusive.
    """
    text = text.strip()
    value = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
    formats = [("%Y-%m-%d %H:%M:%S", 0), ("%Y-%m-%d %H:%M", 59), ("%Y-%m-%d %H", 3599), ("%Y-%m-%d", 86399)]
    for fmt, span in formats if value is None else []:
        try:
            stamp = datetime.strptime(text.replace("T", " "), fmt).replace(tzinfo=UTC8)
        except ValueError:
            continue
        value = int(stamp.timestamp()) + (span if end else 0)
        break
    if value is None:
        raise PopPriorError(f"cannot read time {text!r}: use unix seconds or YYYY-MM-DD[ HH[:MM[:SS]]] (UTC+8)")
    try:
        iso_utc8(value)  # the summary shows every time as a date: it must have one
    except (OverflowError, ValueError, OSError):
        raise PopPriorError(f"time {text!r} is out of range for a calendar date") from None
    return value


def iso_utc8(ts: int) -> str:
    """Unix seconds as ISO 8601 in UTC+8 (independent of the machine's timezone)."""
    return datetime.fromtimestamp(int(ts), UTC8).isoformat()


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (pure arithmetic, no timezone)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def alibaba_time(text: str) -> int | None:
    """``YYYY-MM-DD HH`` (UTC+8) to unix seconds, computed arithmetically; None if malformed."""
    if len(text) != 13 or text[4] != "-" or text[7] != "-" or text[10] != " ":
        return None
    parts = text[:4], text[5:7], text[8:10], text[11:13]
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    y, m, d, h = map(int, parts)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    if not (1 <= m <= 12 and 1 <= d <= (_MONTH_DAYS[m - 1] - (m == 2 and not leap)) and h <= 23):
        return None
    return _days_from_civil(y, m, d) * 86400 + h * 3600 - UTC8_OFFSET_S


# ----------------------------------------------------------------------------- parsing


_INT64_MAX = 2**63 - 1


def _int_or_none(text: str, signed: bool = False) -> int | None:
    """A decimal integer (non-negative unless ``signed``) that fits int64, else None."""
    digits = text[1:] if signed and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        return None
    value = int(text)
    return value if -_INT64_MAX - 1 <= value <= _INT64_MAX else None


class BlockParser:
    """Parses blocks of one raw log kind into :class:`Block` s (see module docstring)."""

    def __init__(self, kind: str, behaviors: set[int], window: tuple[int | None, int | None], dedup: bool,
                 sample_users: float | None = None):
        self.kind, self.behaviors, self.dedup, self.sample_users = kind, behaviors, dedup, sample_users
        self.start, self.end = window
        self.columns = TIANCHI_COLUMNS if kind == "tianchi" else ALIBABA_COLUMNS
        self._name2code = {name.encode(): code for code, name in BEHAVIORS["tianchi"].items()}
        self._geohash_ids: dict[bytes, int] = {b"": 0}
        self._lock = threading.Lock()
        types = {c: pa.int64() for c in self.columns}
        dictionary = pa.dictionary(pa.int32(), pa.binary())  # encoded while parsing: few distinct values
        if kind == "tianchi":
            types["behavior_type"] = dictionary
        else:
            types["user_geohash"] = dictionary
            types["time"] = dictionary
        self._wanted = np.zeros(256, bool)
        self._wanted[list(behaviors)] = True
        self._read = pcsv.ReadOptions(column_names=self.columns, use_threads=False, block_size=1 << 30)
        self._parse = pcsv.ParseOptions(quote_char=False, double_quote=False, newlines_in_values=False)
        self._convert = pcsv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False,
                                            null_values=[], check_utf8=False)
        self._time_cache: dict[bytes, int | None] = {}

    # Fast path -----------------------------------------------------------------
    def parse(self, chunk: bytes, first_line: int) -> Block:
        """Parse one block whose first line has 1-based number ``first_line``."""
        n_lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
        if self._lenient(chunk):
            return self._parse_slow(chunk, first_line)
        try:
            table = pcsv.read_csv(pa.BufferReader(chunk), read_options=self._read,
                                  parse_options=self._parse, convert_options=self._convert)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return self._parse_slow(chunk, first_line)
        if table.num_rows != n_lines:  # an empty line was skipped: keep exact line order
            return self._parse_slow(chunk, first_line)
        cols = {c: table.column(c) for c in self.columns}
        if self.kind == "tianchi":
            behavior, bad_beh = self._tianchi_behavior(cols["behavior_type"])
            ts = cols["timestamp"].to_numpy()
            bad_time = np.zeros(len(ts), bool)
            category = cols["category_id"].to_numpy()
            geohash = None
        else:
            behavior = cols["behavior_type"].to_numpy()
            bad_beh = (behavior < 1) | (behavior > 4)
            behavior = behavior.astype(np.int8)
            ts, bad_time = self._alibaba_times(cols["time"])
            category = cols["item_category"].to_numpy()
            geohash = self._geohash(cols["user_geohash"])
            if geohash is None:  # a geohash with bytes that are not UTF-8
                return self._parse_slow(chunk, first_line)
        user, item = cols["user_id"].to_numpy(), cols["item_id"].to_numpy()
        if n_lines and (min(user.min(), item.min(), category.min()) < 0 or bad_time.any() or bad_beh.any()):
            return self._parse_slow(chunk, first_line)  # rare: the slow path classifies and reports the rows
        block = Block(user, item, ts, behavior, category, geohash if self.dedup else None, rows=n_lines)
        return self._filter(block)

    def _lenient(self, chunk: bytes) -> bool:
        """Could pyarrow's integer parser accept text the slow path rejects? It trims spaces
        and reads ``0x`` hex and ``-0``; blocks where that might happen take the slow path."""
        if self.kind == "tianchi":  # no spaces, 'x' or '-' in a clean UserBehavior block
            return any(c in chunk for c in (b" ", b"\t", b"x", b"X", b"-"))
        # alibaba: the time field holds ' ' and '-', the geohash may hold 'x': look at field starts/ends
        if chunk[:1] in (b" ", b"\t", b"-") or chunk[:2] in (b"0x", b"0X") or b"\t" in chunk:
            return True
        return any(p in chunk for p in (b", ", b" ,", b"\n ", b",-", b"\n-", b",0x", b",0X", b"\n0x", b"\n0X"))

    def _tianchi_behavior(self, column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        encoded = _dictionary(column)
        lookup = np.array([self._name2code.get(v, 0) for v in encoded.dictionary.to_pylist()] or [0], np.int8)
        codes = lookup[encoded.indices.to_numpy(zero_copy_only=False)]
        return codes, codes == 0

    def _alibaba_times(self, column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        encoded = _dictionary(column)
        values = []
        for raw in encoded.dictionary.to_pylist():
            if raw not in self._time_cache:
                try:
                    self._time_cache[raw] = alibaba_time(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self._time_cache[raw] = None
            values.append(self._time_cache[raw])
        lookup = np.array([-1 if v is None else v for v in values] or [0], np.int64)
        invalid = np.array([v is None for v in values] or [True])
        idx = encoded.indices.to_numpy(zero_copy_only=False)
        return lookup[idx], invalid[idx]

    def _geohash_id(self, raw: bytes) -> int:
        """A global id for a raw geohash string (shared by the worker threads)."""
        gid = self._geohash_ids.get(raw)
        if gid is None:
            with self._lock:
                gid = self._geohash_ids.setdefault(raw, len(self._geohash_ids))
        return gid

    def _geohash(self, column: pa.ChunkedArray) -> np.ndarray | None:
        """Geohash ids (dedup only), or None when a value is not UTF-8."""
        encoded = _dictionary(column)
        values = encoded.dictionary.to_pylist()
        lookup = np.zeros(max(len(values), 1), np.int32)
        for j, raw in enumerate(values):
            if raw not in self._geohash_ids:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return None
            if self.dedup:
                lookup[j] = self._geohash_id(raw)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]

    # Slow path -----------------------------------------------------------------
    def _parse_slow(self, chunk: bytes, first_line: int) -> Block:
        """Line-by-line parse of one block: skips, counts and records bad rows."""
        cols: list[list[int]] = [[], [], [], [], [], []]
        bad: Counter = Counter()
        examples: list = []
        rows = blank = 0
        lines = chunk.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for offset, raw in enumerate(lines):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                blank += 1
                continue
            rows += 1
            parsed = self._parse_line(raw)
            if isinstance(parsed, str):
                bad[parsed] += 1
                if len(examples) < 5:
                    examples.append((first_line + offset, parsed, raw[:200].decode("utf-8", "replace")))
                continue
            for target, value in zip(cols, parsed):
                target.append(value)
        user, item, ts, category, geohash = (np.array(c, np.int64) for c in (cols[0], cols[1], cols[2], cols[4], cols[5]))
        block = Block(user, item, ts, np.array(cols[3], np.int8), category,
                      geohash.astype(np.int32) if self.dedup and self.kind == "alibaba" else None,
                      rows=rows, blank_lines=blank, bad=bad, bad_examples=examples)
        return self._filter(block)

    def _parse_line(self, raw: bytes) -> tuple | str:
        """(user, item, ts, behavior code, category, geohash id) or the kind of problem."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "encoding"
        fields = text.split(",")
        if len(fields) != len(self.columns):
            return "column_count"
        if self.kind == "tianchi":
            user, item, category, behavior, ts = fields
            user, item, category = _int_or_none(user), _int_or_none(item), _int_or_none(category)
            if user is None or item is None or category is None:
                return "bad_id"
            stamp = _int_or_none(ts, signed=True)
            if stamp is None:
                return "bad_time"
            code = self._name2code.get(behavior.encode(), 0)
            if not code:
                return "unknown_behavior"
            return user, item, stamp, code, category, 0
        user, item, behavior, geohash, category, ts = fields
        user, item, category = _int_or_none(user), _int_or_none(item), _int_or_none(category)
        if user is None or item is None or category is None:
            return "bad_id"
        stamp = alibaba_time(ts)
        if stamp is None:
            return "bad_time"
        code = _int_or_none(behavior)
        if code is None or not 1 <= code <= 4:
            return "unknown_behavior"
        gid = self._geohash_id(geohash.encode()) if self.dedup else 0
        return user, item, stamp, code, category, gid

    # Filters -------------------------------------------------------------------
    def _filter(self, block: Block) -> Block:
        """Drop rows out of the time window, then rows of unwanted behaviours, then rows of users
        outside the ``sample_users`` subset (in that order)."""
        keep = np.ones(len(block.user), bool)
        if self.start is not None:
            keep &= block.ts >= self.start
        if self.end is not None:
            keep &= block.ts <= self.end
        in_window = int(keep.sum())
        block.dropped["out_of_window"] = len(keep) - in_window
        keep &= self._wanted[block.behavior]
        kept = int(keep.sum())
        block.dropped["behavior"] = in_window - kept
        if self.sample_users is not None:
            keep &= keep_users(block.user, self.sample_users)
            sampled = int(keep.sum())
            block.dropped["sample_users"] = kept - sampled
            kept = sampled
        if kept < len(keep):
            rows = np.flatnonzero(keep)
            block.user, block.item, block.ts = block.user[rows], block.item[rows], block.ts[rows]
            block.behavior, block.category = block.behavior[rows], block.category[rows]
            if block.geohash is not None:
                block.geohash = block.geohash[rows]
        return block


def _dictionary(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """One dictionary array for a dictionary-typed column (chunks unified if needed)."""
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], pa.dictionary(pa.int32(), pa.binary()))
    return column.unify_dictionaries().combine_chunks()


def read_header(stream: BinaryIO, kind: str) -> tuple[bytes, int]:
    """Consume the alibaba header line; returns (leftover bytes, lines consumed)."""
    if kind != "alibaba":
        return b"", 0
    buf = b""
    while b"\n" not in buf and len(buf) < 1 << 16:
        data = stream.read(4096)
        if not data:
            break
        buf += data
    line, _, rest = buf.partition(b"\n")
    header = line.decode("utf-8", "replace").lstrip("\ufeff").strip().split(",")
    if [h.strip() for h in header] != ALIBABA_COLUMNS:
        shown = line[:120].decode("utf-8", "replace")
        raise PopPriorError(f"unexpected header {shown!r}: an alibaba log starts with {','.join(ALIBABA_COLUMNS)}")
    return rest, 1
