"""Raw Tianchi / Alibaba logs to RecBole atomic files (DESIGN.md §5).

    convert("tianchi", "UserBehavior.csv", "dataset")     # -> dataset/tianchi/tianchi.inter
    convert("alibaba", "tianchi_mobile_recommend_train_user.zip", "dataset", behaviors="click,cart")
    convert("tianchi", "UserBehavior.csv", "dataset", name="tianchi10", sample_users=0.1)  # a 10% user subset

Rows are read in a stream (pass 1, :mod:`~recbole_popprior.converters.read`), checked, filtered and spilled as
compact columns into user-range buckets; then each bucket is sorted and de-duplicated, the
k-core found over all of them, and the rows written in order (pass 2, :mod:`~recbole_popprior.converters.buckets`).
Memory stays bounded by the bucket size (2M rows) except for the k-core, which holds two
int32 ids per row. The output ``NAME.inter`` is tab separated with the
header ``user_id:token item_id:token timestamp:float behavior_type:token category_id:token``,
rows sorted by user (numeric), then time, then original line.

Dropped rows are counted per reason, in this order: bad rows (per kind of problem), then
``out_of_window``, ``behavior``, ``sample_users`` (users outside the deterministic subset of
:mod:`~recbole_popprior.converters.sample`), ``duplicate`` (an exact copy of an earlier raw
row, the geohash included), ``k_core`` (computed on what is left, so on the subset). Ids are
read as non-negative decimal integers, so ``007`` and ``7`` are the same token. Up to
``max_bad_rows`` bad rows (default 1000) are skipped; one more stops the run.

The ``.inter`` and its summary are committed as one (:mod:`~recbole_popprior.converters.commit`):
a ``NAME.summary.json`` only ever sits beside the ``NAME.inter`` it describes (size and SHA-256),
and an output that would replace the input is refused.
"""

from __future__ import annotations

import logging
import re
import shutil
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
from recbole_popprior.converters.commit import OutputPair
from recbole_popprior.converters.layouts import (BEHAVIORS, DEFAULT_BEHAVIORS, DEFAULT_MAX_BAD_ROWS, KINDS,
                                                 TIANCHI_WINDOW)
from recbole_popprior.converters.read import BAD_KINDS
from recbole_popprior.converters.sample import check_fraction
from recbole_popprior.errors import PopPriorError

MAX_WORKERS = 64  # each parser thread keeps two blocks in flight: a huge count would only fill memory
_PROGRESS_MIN_BYTES = 256 << 20

__all__ = ["convert", "ConversionInterrupted", "format_summary"]


class ConversionInterrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C) during a conversion; temporary files are removed on the way out."""


def convert(kind: str, input: str | Path, output_dir: str | Path, *, name: str | None = None,
            behaviors: str | Sequence[str] | None = None, dedup: bool = True, k_core: int = 0,
            start: str | int | None = None, end: str | int | None = None, sample_users: float | str | None = None,
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
        sample_users: keep only the users whose SplitMix64 hash of the id falls below this
            fraction of 2**64 (0 < f <= 1; default None: every user), see
            :mod:`~recbole_popprior.converters.sample`.
        max_bad_rows: bad rows skipped before the run stops with an error.
        progress: tqdm bars on stderr (default: when stderr is a terminal or the input > 256 MB).
        workers: parser threads (at least 1).

    Returns:
        The summary, also saved as ``NAME.summary.json``.

    Raises:
        PopPriorError: bad options, unreadable or malformed input, too many bad rows, an
            unwritable output directory, an output that would replace the input, or nothing
            left after filtering.
        ConversionInterrupted: SIGINT or SIGTERM; its message says what was left on disk.
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
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or not 1 <= workers <= MAX_WORKERS:
        raise PopPriorError(f"--workers must be an integer from 1 to {MAX_WORKERS}, got {workers!r}")
    sample_users = check_fraction(sample_users)
    input = Path(input)
    out_dir = Path(output_dir) / name
    pair = OutputPair(out_dir, name)
    pair.refuse_to_overwrite(input)
    stream, size, consumed, plain = _read.open_raw(input)
    if progress is None:
        progress = sys.stderr.isatty() or size > _PROGRESS_MIN_BYTES
    try:
        with _terminate_on_sigterm(), _workdir(out_dir, name, pair) as workdir:
            parser = _read.BlockParser(kind, codes, window, dedup, sample_users)
            columns = list(_buckets.COLUMNS) if kind == "alibaba" and dedup else list(_buckets.COLUMNS)[:5]
            bounds = _buckets.sample_bounds(input, rows_per_bucket) if plain else None
            buckets = _buckets.Buckets(workdir, columns, np.zeros(0, np.int64) if bounds is None else bounds)
            stats = _pass1(stream, size, consumed, parser, buckets, kind, max_bad_rows, progress, workers, block_bytes)
            stats.update(input=str(input), kind=kind)
            if buckets.n == 0:
                raise PopPriorError(_nothing_left(stats))
            stores = _buckets.repartition(buckets, workdir, rows_per_bucket) if bounds is None else buckets.stores
            buckets.close()
            options = {"behaviors": [BEHAVIORS[kind][c] for c in sorted(codes)], "dedup": dedup,
                       "k_core": int(k_core), "start": window[0], "end": window[1],
                       "sample_users": 1.0 if sample_users is None else sample_users,
                       "sample_users_hash": "splitmix64", "max_bad_rows": int(max_bad_rows)}
            summary = _pass2(stores, stats, kind, dedup, k_core, pair, progress, options, began)
    except OSError as exc:
        left = "" if pair.stage == "nothing" else f"; {pair.left_behind()}"
        raise PopPriorError(f"cannot write output under {out_dir}: {exc.strerror or exc}{left}") from None
    except KeyboardInterrupt as exc:
        why = str(exc) if isinstance(exc, ConversionInterrupted) else "interrupted"
        raise ConversionInterrupted(f"{why}; {pair.left_behind()}") from None
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
def _workdir(out_dir: Path, name: str, pair: OutputPair) -> Iterator[Path]:
    """The output directory (created), the pair's lock (a killed conversion's temporary files are
    removed, commit.py), and a temporary work directory inside it (removed)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PopPriorError(f"cannot write output directory {out_dir}: {exc.strerror or exc}") from None
    ok = False
    try:
        with pair.exclusive():
            try:
                workdir = Path(tempfile.mkdtemp(prefix=f".{name}.convert-", dir=out_dir))
            except OSError as exc:
                raise PopPriorError(f"cannot write output directory {out_dir}: {exc.strerror or exc}") from None
            try:
                yield workdir
                ok = True
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if not ok and created:
            try:
                out_dir.rmdir()  # only if still empty
            except OSError:
                pass


class _QuietStream:
    """stderr for the progress bars: a closed or full stderr (``2>&1 | head``) stops the bars,
    not the conversion (tqdm only forgives EIO)."""

    def __init__(self, stream: Any):
        self._stream, self._ok = stream, True

    def write(self, text: str) -> int:
        if self._ok:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                self._ok = False
        return len(text)

    def flush(self) -> None:
        if self._ok:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._ok = False


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
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {kind}", disable=not progress,
               file=_QuietStream(sys.stderr))

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


def _pass2(buckets: list, stats: dict, kind: str, dedup: bool, k_core: int, pair: OutputPair,
           progress: bool, options: dict, began: float) -> dict[str, Any]:
    """Sort, de-duplicate, k-core filter and write the buckets, in user order."""
    keys = _buckets.DEDUP_KEYS[kind] if dedup else None
    names = BEHAVIORS[kind]
    n_spilled = sum(b.n for b in buckets)
    bar = tqdm(total=n_spilled, unit="row", unit_scale=True, desc="sorting/writing", disable=not progress,
               file=_QuietStream(sys.stderr))
    try:
        return _sort_filter_write(buckets, stats, kind, keys, names, n_spilled, k_core, pair, bar, options, began)
    finally:
        bar.close()


def _sort_filter_write(buckets: list, stats: dict, kind: str, keys: list | None, names: dict, n_spilled: int,
                       k_core: int, pair: OutputPair, bar: tqdm, options: dict, began: float) -> dict:
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
    with pair.writing_inter() as handle:
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
            raise PopPriorError(_nothing_left(stats, duplicate=duplicates, k_core=n_spilled - duplicates))
        dropped = stats["dropped"]
        summary = {
            "kind": kind, "input": stats["input"], "output": str(pair.inter),
            "rows_read": stats["rows_read"], "rows_kept": kept,
            "dropped": {"bad_rows": int(sum(stats["bad"].values())),
                        "out_of_window": int(dropped["out_of_window"]), "behavior": int(dropped["behavior"]),
                        "sample_users": int(dropped["sample_users"]),
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
    return pair.commit(summary)  # the .inter is in place: now its summary (commit.py's invariant)


def _nothing_left(stats: dict, **later: int) -> str:
    """Why no row is left, reason by reason, with the first bad row (one line)."""
    bad, read = stats["bad"], stats["rows_read"]
    n_bad = int(sum(bad.values()))
    kinds = ", ".join(f"{k} {bad[k]}" for k in BAD_KINDS if bad[k])
    example = ""
    if stats["bad_examples"]:
        line, what, text = stats["bad_examples"][0]
        example = f"; first at line {line}: {what.replace('_', ' ')}: {text!r}"
    if n_bad == read:
        return f"no valid rows: all {read} data rows are malformed ({kinds}){example}"
    counts = {"bad_rows": n_bad, **{k: int(stats["dropped"][k]) for k in ("out_of_window", "behavior", "sample_users")},
              **later}
    reasons = ", ".join(f"{k.replace('_', ' ')} {v}" + (f" ({kinds})" if k == "bad_rows" else "")
                        for k, v in counts.items() if v)
    return (f"no rows left after filtering: {read} rows read, dropped {reasons}{example} "
            f"(check --behaviors, --start/--end, --sample-users and --k-core)")


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
        f"behaviour {d['behavior']:,}, sample users {d['sample_users']:,}, duplicate {d['duplicate']:,}, "
        f"k-core {d['k_core']:,}",
        f"time span {span['min_iso']} .. {span['max_iso']} (UTC+8); {summary['seconds']} s",
    ])
