"""Spill, sort, dedup, k-core and write for the converters (DESIGN.md §5).

Pass 1 appends compact columns straight into user-range buckets, with bounds taken from
user ids sampled at a few hundred places of a plain csv (:func:`sample_bounds`); inputs
that cannot be sampled (``.gz``, ``.zip``) go to one spill that is cut into buckets
afterwards (:func:`repartition`). Each bucket fits in memory and the buckets, in order, are
in user order. Pass 2 sorts each bucket by (user, time, file position); exact duplicates of
a row share its user, hence its bucket, and the first one in file order is kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import polars as pl


COLUMNS = {"user": np.int64, "item": np.int64, "ts": np.int64, "behavior": np.int8,
           "category": np.int64, "geohash": np.int32}
#: Fields that make a row an exact duplicate (the whole raw row), per kind.
DEDUP_KEYS = {"tianchi": ["user", "item", "category", "behavior", "ts"],
              "alibaba": ["user", "item", "behavior", "geohash", "category", "ts"]}
HEADER = "user_id:token\titem_id:token\ttimestamp:float\tbehavior_type:token\tcategory_id:token\n"
_SAMPLE_STEP = 64
_PARTITION_ROWS = 4_000_000
_FLUSH_ROWS = 1 << 18


class ColumnStore:
    """Append-only raw column files (one ``<column>.bin`` per column) in one directory.

    Small appends are buffered and written in batches of about ``_FLUSH_ROWS`` rows.
    """

    def __init__(self, directory: Path, columns: list[str]):
        self.dir, self.columns, self.n = directory, columns, 0
        directory.mkdir(parents=True, exist_ok=True)
        self._handles = {c: open(directory / f"{c}.bin", "wb") for c in columns}
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(arrays[self.columns[0]])
        if n == 0:
            return
        self._buffer.append({c: arrays[c] for c in self.columns})
        self._buffered += n
        self.n += n
        if self._buffered >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        for c in self.columns:
            parts = [np.asarray(b[c], dtype=COLUMNS[c]) for b in self._buffer]
            (np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])).tofile(self._handles[c])
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        if any(not h.closed for h in self._handles.values()):
            self.flush()
        for handle in self._handles.values():
            handle.close()

    def read(self, start: int = 0, count: int | None = None) -> dict[str, np.ndarray]:
        self.close()
        count = self.n - start if count is None else min(count, self.n - start)
        out = {}
        for c in self.columns:
            dtype = np.dtype(COLUMNS[c])
            out[c] = np.fromfile(self.dir / f"{c}.bin", dtype=dtype, count=count, offset=start * dtype.itemsize)
        return out

    def rewrite(self, arrays: dict[str, np.ndarray]) -> None:
        self._handles = {c: open(self.dir / f"{c}.bin", "wb") for c in self.columns}
        self.n = 0
        self.append(arrays)
        self.close()

    def remove(self) -> None:
        self._buffer = []
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def sample_bounds(path: Path, rows_per_bucket: int, probes: int = 512, max_buckets: int = 128) -> np.ndarray | None:
    """User-range bucket bounds from user ids read at ``probes`` places of a plain csv file.

    Returns no bounds (one bucket) for small inputs, and None when the file cannot be sampled
    (the spill is then partitioned after pass 1, see :func:`repartition`).
    """
    size = path.stat().st_size
    users, n_bytes, n_lines = [], 0, 0
    with open(path, "rb") as handle:
        for offset in np.linspace(0, size, probes, endpoint=False).astype(np.int64):
            handle.seek(int(offset))
            lines = handle.read(8192).split(b"\n")[1:-1]  # whole lines only
            n_lines += len(lines)
            n_bytes += sum(len(line) + 1 for line in lines)
            for line in lines[:32]:
                head = line.split(b",", 1)[0]
                if head.isdigit():
                    users.append(int(head))
    if not n_lines:
        return None
    n_buckets = min(max_buckets, -(-int(size / (n_bytes / n_lines)) // rows_per_bucket))
    if n_buckets <= 1:
        return np.zeros(0, np.int64)
    if len(users) < 10 * n_buckets:
        return None
    users = np.sort(np.array(users, np.int64))
    return np.unique(users[(np.arange(1, n_buckets) * len(users)) // n_buckets])


class Buckets:
    """User-range buckets: bucket k holds users in [bounds[k-1], bounds[k])."""

    def __init__(self, workdir: Path, columns: list[str], bounds: np.ndarray):
        self.bounds, self.columns = bounds, columns
        self.stores = [ColumnStore(workdir / f"bucket{k:05d}", columns) for k in range(len(bounds) + 1)]

    def split(self, arrays: dict[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Cut rows into per-bucket pieces, keeping file order within each (thread-safe, no I/O)."""
        if len(self.bounds) == 0:
            return [(0, arrays)]
        bucket_id = np.searchsorted(self.bounds, arrays["user"], side="right").astype(np.uint16)
        if bucket_id[0] == bucket_id[-1] and bucket_id.min() == bucket_id.max():
            return [(int(bucket_id[0]), arrays)]
        order = np.argsort(bucket_id, kind="stable")  # radix sort on 16 bits
        ends = np.cumsum(np.bincount(bucket_id, minlength=len(self.stores)))
        arrays = {c: arrays[c][order] for c in self.columns}
        pieces, begin = [], 0
        for k, end in enumerate(ends):
            if end > begin:
                pieces.append((k, {c: a[begin:end] for c, a in arrays.items()}))
            begin = end
        return pieces

    def append(self, pieces: list[tuple[int, dict[str, np.ndarray]]]) -> None:
        for k, arrays in pieces:
            self.stores[k].append(arrays)

    def close(self) -> None:
        for store in self.stores:
            store.close()

    @property
    def n(self) -> int:
        return sum(store.n for store in self.stores)

    def user_sample(self) -> np.ndarray:
        """Every ``_SAMPLE_STEP``-th user id (for re-partitioning)."""
        parts = []
        for store in self.stores:
            store.close()
            for start in range(0, store.n, _PARTITION_ROWS):
                count = min(_PARTITION_ROWS, store.n - start)
                parts.append(np.fromfile(store.dir / "user.bin", np.int64, count=count, offset=8 * start)[::_SAMPLE_STEP])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def repartition(buckets: Buckets, workdir: Path, rows_per_bucket: int) -> list[ColumnStore]:
    """Cut a single-bucket spill into user-range buckets (inputs that could not be sampled)."""
    buckets.close()
    n_buckets = -(-buckets.n // rows_per_bucket)
    if len(buckets.stores) > 1 or n_buckets <= 1:
        return buckets.stores
    sample = np.sort(buckets.user_sample())
    bounds = np.unique(sample[(np.arange(1, n_buckets) * len(sample)) // n_buckets])
    spill = buckets.stores[0]
    out = Buckets(workdir / "parts", buckets.columns, bounds)
    for start in range(0, spill.n, _PARTITION_ROWS):
        out.append(out.split(spill.read(start, _PARTITION_ROWS)))
    out.close()
    spill.remove()
    return out.stores


def sort_rows(user: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order by (user, time, position), i.e. the stable sort; returns (order, sorted user, sorted ts).

    When user, time and position fit in one int64 key, the key is sorted directly (no
    indirection) and the sorted user and time are decoded from it.
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, np.int64), user, ts
    u0, t0 = int(user.min()), int(ts.min())
    pos_bits = max(int(n - 1).bit_length(), 1)
    ts_bits = int(int(ts.max()) - t0).bit_length()
    user_bits = int(int(user.max()) - u0).bit_length()
    if user_bits + ts_bits + pos_bits > 63:
        order = np.lexsort((ts, user))
        return order, user[order], ts[order]
    key = (user - u0) << (ts_bits + pos_bits)
    key |= (ts - t0) << pos_bits
    key |= np.arange(n, dtype=np.int64)
    key.sort()
    order = key & ((1 << pos_bits) - 1)
    key >>= pos_bits
    sorted_ts = (key & ((1 << ts_bits) - 1)) + t0
    key >>= ts_bits
    key += u0
    return order, key, sorted_ts


def duplicate_rows(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """Positions of exact duplicates (all ``keys`` equal to an earlier row) in rows sorted by
    (user, time, position); the first copy is kept. Duplicates share user and time, so only rows
    in runs of equal (user, time) are compared."""
    user, ts = arrays["user"], arrays["ts"]
    same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    if not same.any():
        return np.zeros(0, np.int64)
    run = np.concatenate([[0], np.cumsum(~same)])
    in_run = np.zeros(len(user), bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    rows = np.flatnonzero(in_run)
    others = [k for k in keys if k not in ("user", "ts")]
    order = np.lexsort([rows] + [arrays[k][rows] for k in reversed(others)] + [run[rows]])
    rows = rows[order]
    equal = run[rows[1:]] == run[rows[:-1]]
    for k in others:
        column = arrays[k][rows]
        equal &= column[1:] == column[:-1]
    return rows[1:][equal]


def sort_bucket(arrays: dict[str, np.ndarray], dedup_keys: list[str] | None) -> tuple[dict[str, np.ndarray], int]:
    """Sort by (user, time, line), then drop exact duplicates (keeping the first in file order).

    Returns the sorted columns and the number of duplicates dropped.
    """
    n = len(arrays["user"])
    order, user, ts = sort_rows(arrays["user"], arrays["ts"])
    rest = [c for c in arrays if c not in ("user", "ts")]
    gathered = pl.DataFrame({c: arrays[c] for c in rest}).select(pl.all().gather(order))  # parallel gathers
    out = {"user": user, "ts": ts, **{c: gathered[c].to_numpy() for c in rest}}
    if dedup_keys:
        duplicates = duplicate_rows(out, dedup_keys)
        if len(duplicates):
            keep = np.ones(n, bool)
            keep[duplicates] = False
            rows = np.flatnonzero(keep)
            out = {c: a[rows] for c, a in out.items()}
    return out, n - len(out["user"])


def dense_users(user: np.ndarray, first: int) -> np.ndarray:
    """int32 user index of sorted user ids, starting at ``first`` (buckets continue the count)."""
    idx = np.empty(len(user), np.int32)
    if len(user):
        idx[0] = first
        np.cumsum(user[1:] != user[:-1], dtype=np.int32, out=idx[1:])
        idx[1:] += first
    return idx


class ItemIndex:
    """int32 item index, built bucket by bucket: the raw id itself when ids are small (no
    copy kept at int64), else a factorisation of all items at the end."""

    def __init__(self, max_item: int):
        self.direct = max_item < 1 << 28
        self._parts: list[np.ndarray] = []

    def add(self, items: np.ndarray) -> None:
        self._parts.append(items.astype(np.int32) if self.direct else items)

    def finish(self) -> np.ndarray:
        parts, self._parts = self._parts, []
        if not parts:
            return np.zeros(0, np.int32)
        if self.direct:
            return np.concatenate(parts)

        return pd.factorize(np.concatenate(parts))[0].astype(np.int32)


def k_core(user_idx: np.ndarray, item_idx: np.ndarray, k: int) -> np.ndarray:
    """Keep mask of the k-core: iterate until every kept user and item has >= k kept rows.

    ``user_idx`` and ``item_idx`` are small non-negative integer ids (see :func:`dense_users`).
    """
    n = len(user_idx)
    rows = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    while len(rows):
        user_ok = np.bincount(user_idx) >= k
        item_ok = np.bincount(item_idx) >= k
        alive = user_ok[user_idx]
        alive &= item_ok[item_idx]
        if alive.all():
            break
        rows, user_idx, item_idx = rows[alive], user_idx[alive], item_idx[alive]
    keep = np.zeros(n, bool)
    keep[rows] = True
    return keep


def write_tsv(handle: BinaryIO, arrays: dict[str, np.ndarray], behavior_names: dict[int, str]) -> None:
    """Append rows as ``user item timestamp behavior category`` (tab separated, no header)."""
    if len(arrays["user"]) == 0:
        return
    out = pl.DataFrame({c: arrays[c] for c in ("user", "item", "ts", "behavior", "category")}).select(
        pl.col("user"), pl.col("item"), pl.col("ts"),
        pl.col("behavior").replace_strict(behavior_names, return_dtype=pl.String),
        pl.col("category"),
    )
    out.write_csv(handle, separator="\t", include_header=False)


class ItemCounter:
    """Counts distinct item ids across buckets (a bitmap when ids are small)."""

    def __init__(self, max_item: int):
        self._bitmap = np.zeros(max_item + 1, bool) if max_item < 1 << 28 else None
        self._parts: list[np.ndarray] = []

    def add(self, items: np.ndarray) -> None:
        if self._bitmap is not None:
            self._bitmap[items] = True
        else:

            self._parts.append(pd.unique(items))

    def count(self) -> int:
        if self._bitmap is not None:
            return int(self._bitmap.sum())
        if not self._parts:
            return 0

        return len(pd.unique(np.concatenate(self._parts)))

