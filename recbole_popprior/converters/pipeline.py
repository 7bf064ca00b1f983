"""Raw Tianchi / Alibaba logs to RecBole atomic files (DESIGN.md §5).

    convert("tianchi", "UserBehavior.csv", "dataset")     # -> dataset/tianchi/tianchi.inter
    convert("alibaba", "tianchi_mobile_recommend_train_user.zip", "dataset", behaviors="click,cart")

Rows are read in a stream (pass 1, :mod:`~recbole_popprior.converters.read`), checked, filtered and spilled as
compact columns into user-range buckets; then each bucket is sorted and de-duplicated, the
k-core found over all of them, and the rows written in order (pass 2, :mod:`~recbole_popprior.converters.buckets`).
Memory stays bounded by the bucket size (2M rows) except for the k-core, which holds two
int32 ids per row. The output ``NAME.inter`` is tab separated with the
header ``user_id:token item_id:token timestamp:float behavior_type:token category_id:token``,
rows sorted by user (numeric), then time, then original line.

Dropped rows are counted per reason, in this order: bad rows (per kind of problem), then
``out_of_window``, ``behavior``, ``duplicate`` (an exact copy of an earlier raw row, the
geohash included), ``k_core``. Ids are read as non-negative decimal integers, so ``007`` and
``7`` are the same token. Up to ``max_bad_rows`` bad rows (default 1000) are skipped; one
more stops the run. Nothing is written under the final names unless the run succeeds.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from recbole_popprior.converters import buckets as _buckets
from recbole_popprior.converters import read as _read
from recbole_popprior.converters.read import BAD_KINDS, BEHAVIORS, DEFAULT_BEHAVIORS, TIANCHI_WINDOW
from recbole_popprior.errors import PopPriorError
from recbole_popprior.utils import atomic_write, write_json

KINDS = ("tianchi", "alibaba")
DEFAULT_MAX_BAD_ROWS = 1000
_PROGRESS_MIN_BYTES = 256 << 20

__all__ = ["convert", "KINDS", "DEFAULT_MAX_BAD_ROWS", "ConversionInterrupted", "format_summary"]


class ConversionInterrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C) during a conversion; temporary files are removed on the way out."""


def convert(kind: str, input: str | Path, output_dir: str | Path, *, name: str | None = None,
            behaviors: str | Sequence[str] | None = None, dedup: bool = True, k_core: int = 0,
            start: str | int | None = None, end: str | int | None = None,
            max_bad_rows: int = DEFAULT_MAX_BAD_ROWS, progress: bool | None = None, workers: int = 2,
            rows_per_bucket: int = 2_000_000, block_bytes: int = 1 << 20) -> dict[str, Any]:
    """Convert a raw log into ``output_dir/NAME/NAME.inter`` and ``NAME.summary.json``.

    Args:
        kind: ``"tianchi"`` (UserBehavior.csv) or ``"alibaba"`` (tianchi_mobile_recommend_train_user.csv).
        input: the raw ``.csv``, ``.csv.gz`` or single-member ``.zip``.
        output_dir: parent of the dataset directory ``NAME`` (default NAME: the kind).
        behaviors: names (``pv,buy,cart,fav`` / ``click,collect,cart,buy``), alibaba codes
            ``1..4``, or ``all``; default ``pv`` / ``click``.
        dedup: drop exact duplicate raw rows, keeping the first.
        k_core: keep the K-core of users and items (0 or 1: off).
        start, end: inclusive time window, unix seconds or ``YYYY-MM-DD[ HH[:MM[:SS]]]`` in
            UTC+8; tianchi defaults to the official 2017-11-25..2017-12-03, alibaba to none.
        max_bad_rows: bad rows skipped before the run stops with an error.
        progress: tqdm bars on stderr (default: when stderr is a terminal or the input > 256 MB).

    Returns:
        The summary, also saved as ``NAME.summary.json``.

    Raises:
        PopPriorError: bad options, unreadable or malformed input, too many bad rows, an
            unwritable output directory, or nothing left after filtering.
    """
    began = time.time()
    if kind not in KINDS:
        raise PopPriorError(f"unknown log kind {kind!r}: choose one of {', '.join(KINDS)}")
    name = _check_name(name or kind)
    codes = parse_behaviors(kind, behaviors)
    window = _window(kind, start, end)
    if not isinstance(k_core, (int, np.integer)) or k_core < 0:
        raise PopPriorError(f"--k-core must be a non-negative integer, got {k_core!r}")
    if not isinstance(max_bad_rows, (int, np.integer)) or max_bad_rows < 0:
        raise PopPriorError(f"--max-bad-rows must be a non-negative integer, got {max_bad_rows!r}")
    input = Path(input)
    stream, size, consumed, plain = _read.open_raw(input)
    out_dir = Path(output_dir) / name
    if progress is None:
        progress = sys.stderr.isatty() or size > _PROGRESS_MIN_BYTES
    try:
        with _terminate_on_sigterm(), _workdir(out_dir, name) as workdir:
            parser = _read.BlockParser(kind, codes, window, dedup)
            columns = list(_buckets.COLUMNS) if kind == "alibaba" and dedup else list(_buckets.COLUMNS)[:5]
            bounds = _buckets.sample_bounds(input, rows_per_bucket) if plain else None
            buckets = _buckets.Buckets(workdir, columns, np.zeros(0, np.int64) if bounds is None else bounds)
            stats = _pass1(stream, size, consumed, parser, buckets, kind, max_bad_rows, progress, workers, block_bytes)
            stats.update(input=str(input), kind=kind)
            stores = _buckets.repartition(buckets, workdir, rows_per_bucket) if bounds is None else buckets.stores
            buckets.close()
            options = {"behaviors": [BEHAVIORS[kind][c] for c in sorted(codes)], "dedup": dedup,
                       "k_core": int(k_core), "start": window[0], "end": window[1],
                       "max_bad_rows": int(max_bad_rows)}
            summary = _pass2(stores, stats, kind, dedup, k_core, out_dir, name, progress, options, began)
    except OSError as exc:
        raise PopPriorError(f"cannot write output under {out_dir}: {exc.strerror or exc}") from None
    finally:
        stream.close()
    logging.getLogger().info(f"converted {input} -> {summary['output']}: {summary['rows_kept']} rows")
    return summary


# ----------------------------------------------------------------------------- options


def parse_behaviors(kind: str, behaviors: str | Sequence[str] | None) -> set[int]:
    """Behaviour names (or alibaba codes 1..4, or ``all``) to the set of codes to keep."""
    if behaviors is None:
        behaviors = DEFAULT_BEHAVIORS[kind]
    if isinstance(behaviors, str):
        behaviors = behaviors.split(",")
    name2code = {v: k for k, v in BEHAVIORS[kind].items()}
    codes = set()
    for raw in behaviors:
        token = str(raw).strip().lower()
        if token == "all":
            codes |= set(name2code.values())
        elif token in name2code:
            codes.add(name2code[token])
        elif kind == "alibaba" and token in {"1", "2", "3", "4"}:
            codes.add(int(token))
        elif token:
            allowed = ",".join(name2code) + (" or codes 1..4" if kind == "alibaba" else "")
            raise PopPriorError(f"unknown {kind} behaviour {raw!r}: use {allowed} (or all)")
    if not codes:
        raise PopPriorError("--behaviors is empty")
    return codes


def _window(kind: str, start: str | int | None, end: str | int | None) -> tuple[int | None, int | None]:
    lo, hi = TIANCHI_WINDOW if kind == "tianchi" else (None, None)
    if start is not None:
        lo = _read.parse_time_utc8(str(start))
    if end is not None:
        hi = _read.parse_time_utc8(str(end), end=True)
    if lo is not None and hi is not None and lo > hi:
        raise PopPriorError(f"empty time window: start {_read.iso_utc8(lo)} is after end {_read.iso_utc8(hi)}")
    return lo, hi


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise PopPriorError(f"bad dataset name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`ConversionInterrupted`, so the clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise ConversionInterrupted(f"interrupted by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _workdir(out_dir: Path, name: str) -> Iterator[Path]:
    """The output directory (created) and a temporary work directory inside it (removed)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{name}.convert-", dir=out_dir))
    except OSError as exc:
        raise PopPriorError(f"cannot write output directory {out_dir}: {exc.strerror or exc}") from None
    ok = False
    try:
        yield workdir
        ok = True
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        if not ok and created:
            try:
                out_dir.rmdir()  # only if still empty
            except OSError:
                pass


# ----------------------------------------------------------------------------- passes


def _pass1(stream, size: int, consumed, parser: _read.BlockParser, buckets: _buckets.Buckets, kind: str,
           max_bad_rows: int, progress: bool, workers: int, block_bytes: int) -> dict[str, Any]:
    """Stream, parse and filter the raw log into the spill; count what was dropped and why."""
    leftover, header_lines = _read.read_header(stream, kind)
    rows = blank = 0
    bad: Counter = Counter()
    dropped: Counter = Counter()
    examples: list = []
    max_user = max_item = -1
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {kind}", disable=not progress, file=sys.stderr)

    def chunks() -> Iterator[tuple[bytes, int]]:
        line = header_lines + 1
        source = _read.iter_chunks(stream, block_bytes)
        if leftover:
            source = _prepend(leftover, source)
        for chunk in source:
            yield chunk, line
            line += chunk.count(b"\n")

    def parse(chunk: bytes, line: int) -> tuple[_read.Block, list]:
        block = parser.parse(chunk, line)
        arrays = {"user": block.user, "item": block.item, "ts": block.ts, "behavior": block.behavior,
                  "category": block.category, "geohash": block.geohash}
        return block, buckets.split(arrays) if len(block.user) else []

    def collect(result: tuple[_read.Block, list]) -> None:
        block, pieces = result
        nonlocal rows, blank, max_user, max_item
        rows += block.rows
        blank += block.blank_lines
        bad.update(block.bad)
        dropped.update(block.dropped)
        examples.extend(block.bad_examples[: max(0, 5 - len(examples))])
        total_bad = sum(bad.values())
        if total_bad > max_bad_rows:
            line, what, text = examples[0]
            raise PopPriorError(f"too many bad rows ({total_bad} > --max-bad-rows {max_bad_rows}); "
                                f"first at line {line}: {what.replace('_', ' ')}: {text!r}")
        if len(block.user):
            max_user, max_item = max(max_user, int(block.user.max())), max(max_item, int(block.item.max()))
            buckets.append(pieces)
        bar.update(consumed() - bar.n)

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    pending: deque = deque()
    try:
        for chunk, line in chunks():
            pending.append(pool.submit(parse, chunk, line))
            while len(pending) > 2 * max(1, workers):
                collect(pending.popleft().result())
        while pending:
            collect(pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if rows == 0:
        raise PopPriorError("input has no data rows" + (" after its header" if header_lines else ""))
    return {"rows_read": rows, "blank_lines": blank, "bad": bad, "bad_examples": examples,
            "dropped": dropped, "max_user": max_user, "max_item": max_item}


def _prepend(first: bytes, source: Iterator[bytes]) -> Iterator[bytes]:
    """Glue the bytes after the header onto the first block (up to its last newline)."""
    pending = first
    for chunk in source:
        chunk = pending + chunk
        pending = b""
        yield chunk
    if pending:
        yield pending


def _pass2(buckets: list, stats: dict, kind: str, dedup: bool, k_core: int, out_dir: Path, name: str,
           progress: bool, options: dict, began: float) -> dict[str, Any]:
    """Sort, de-duplicate, k-core filter and write the buckets, in user order."""
    keys = _buckets.DEDUP_KEYS[kind] if dedup else None
    names = BEHAVIORS[kind]
    n_spilled = sum(b.n for b in buckets)
    bar = tqdm(total=n_spilled, unit="row", unit_scale=True, desc="sorting/writing", disable=not progress,
               file=sys.stderr)
    try:
        return _sort_filter_write(buckets, stats, kind, keys, names, n_spilled, k_core, out_dir, name, bar,
                                  options, began)
    finally:
        bar.close()


def _sort_filter_write(buckets: list, stats: dict, kind: str, keys: list | None, names: dict, n_spilled: int,
                       k_core: int, out_dir: Path, name: str, bar: tqdm, options: dict, began: float) -> dict:
    duplicates = 0
    keep = None
    if k_core > 1:  # first sort + dedup every bucket, then find the core over all of them
        user_idx, items, n_users = [], _buckets.ItemIndex(stats["max_item"]), 0
        for bucket in buckets:
            arrays, dup = _buckets.sort_bucket(bucket.read(), keys)
            duplicates += dup
            bucket.rewrite(arrays)
            user_idx.append(_buckets.dense_users(arrays["user"], n_users))
            n_users = int(user_idx[-1][-1]) + 1 if len(arrays["user"]) else n_users
            items.add(arrays["item"])
            del arrays
        item_idx = items.finish()
        user_idx = np.concatenate(user_idx) if user_idx else np.zeros(0, np.int32)
        keep = _buckets.k_core(user_idx, item_idx, k_core)
        del user_idx, item_idx
    kept = n_users = 0
    ts_min, ts_max = None, None
    item_counter = _buckets.ItemCounter(max(stats["max_item"], 0))
    inter_path = out_dir / f"{name}.inter"
    with atomic_write(inter_path, "wb") as handle:
        handle.write(_buckets.HEADER.encode())
        starts = np.cumsum([0] + [b.n for b in buckets])

        def prepare(k: int) -> tuple[dict, int]:
            arrays = buckets[k].read()
            if keep is None:
                return _buckets.sort_bucket(arrays, keys)
            rows = np.flatnonzero(keep[starts[k]: starts[k + 1]])
            return {c: a[rows] for c, a in arrays.items()}, 0

        for k, (arrays, dup) in enumerate(_prefetched(prepare, len(buckets))):
            duplicates += dup
            bar.update(buckets[k].n)
            buckets[k].remove()
            user = arrays["user"]
            if len(user) == 0:
                continue
            _buckets.write_tsv(handle, arrays, names)
            kept += len(user)
            n_users += int(np.count_nonzero(user[1:] != user[:-1])) + 1
            item_counter.add(arrays["item"])
            lo, hi = int(arrays["ts"].min()), int(arrays["ts"].max())
            ts_min = lo if ts_min is None else min(ts_min, lo)
            ts_max = hi if ts_max is None else max(ts_max, hi)
        if kept == 0:
            raise PopPriorError("no rows left after filtering (check --behaviors, --start/--end and --k-core)")
        dropped = stats["dropped"]
        summary = {
            "kind": kind, "input": stats["input"], "output": str(inter_path),
            "rows_read": stats["rows_read"], "rows_kept": kept,
            "dropped": {"bad_rows": int(sum(stats["bad"].values())),
                        "out_of_window": int(dropped["out_of_window"]), "behavior": int(dropped["behavior"]),
                        "duplicate": int(duplicates), "k_core": int(n_spilled - duplicates - kept)},
            "bad_rows": {k: int(stats["bad"][k]) for k in BAD_KINDS},
            "bad_examples": [{"line": line, "problem": what, "text": text}
                             for line, what, text in stats["bad_examples"]],
            "blank_lines": stats["blank_lines"],
            "users": int(n_users), "items": item_counter.count(),
            "time_span": {"min": ts_min, "max": ts_max,
                          "min_iso": _read.iso_utc8(ts_min), "max_iso": _read.iso_utc8(ts_max)},
            "options": options,
            "seconds": round(time.time() - began, 3),
        }
        # The summary is renamed into place just before the .inter (on leaving this block).
        write_json(out_dir / f"{name}.summary.json", summary)
    return summary


def _prefetched(prepare, n: int) -> Iterator:
    """``prepare(0..n-1)``, each computed in a helper thread while the caller uses the previous one."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(prepare, 0) if n else None
        for k in range(n):
            result = future.result()
            future = pool.submit(prepare, k + 1) if k + 1 < n else None
            yield result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines (the CLI prints them)."""
    d = summary["dropped"]
    bad = ", ".join(f"{k}={v}" for k, v in summary["bad_rows"].items() if v) or "none"
    span = summary["time_span"]
    return "\n".join([
        f"wrote {summary['output']}",
        f"rows read {summary['rows_read']:,}, kept {summary['rows_kept']:,}; users {summary['users']:,}, "
        f"items {summary['items']:,}",
        f"dropped: bad rows {d['bad_rows']:,} ({bad}), out of window {d['out_of_window']:,}, "
        f"behaviour {d['behavior']:,}, duplicate {d['duplicate']:,}, k-core {d['k_core']:,}",
        f"time span {span['min_iso']} .. {span['max_iso']} (UTC+8); {summary['seconds']} s",
    ])
