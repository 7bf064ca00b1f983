"""Command line of the raw-log converters (docs/DESIGN.md §5, :mod:`recbole_popprior.converters`).

    python -m recbole_popprior.convert {tianchi,alibaba} --input FILE --output DIR [--name NAME]
        [--behaviors pv,cart,...] [--dedup/--no-dedup] [--k-core K] [--start T --end T]
        [--sample-users FRACTION] [--max-bad-rows N] [--no-progress] [--workers N]

Writes DIR/NAME/NAME.inter and DIR/NAME/NAME.summary.json. Bad input ends with one
``error:`` line and exit status 2; an interrupted run exits 130 with one ``error:`` line
saying what it left on disk (normally nothing). A reader of stdout that goes away early
(``| head -0``) is not an error: the files are complete before anything is printed, so the
status stays 0 (141, the shell's SIGPIPE status, would fail ``set -o pipefail`` scripts
for a conversion that succeeded).

The parser and ``--help`` need the standard library only (:mod:`~recbole_popprior.converters.layouts`);
the pipeline (numpy, pyarrow, polars) loads after parsing, through the package's lazy
``recbole_popprior.conversion``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import NoReturn, Sequence, TextIO

import recbole_popprior
from recbole_popprior.converters.layouts import DEFAULT_MAX_BAD_ROWS, KINDS, input_layouts
from recbole_popprior.errors import PopPriorError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every plugin CLI
        _say(sys.stderr, f"error: {message}")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m recbole_popprior.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Convert the Tianchi UserBehavior or Alibaba mobile log into RecBole atomic files.",
                epilog=input_layouts())
    p.add_argument("kind", choices=KINDS, help="tianchi: UserBehavior.csv; alibaba: tianchi_mobile_recommend_train_user.csv")
    p.add_argument("--input", required=True, help="raw .csv, .csv.gz or single-member .zip")
    p.add_argument("--output", required=True, help="writes OUTPUT/NAME/NAME.inter")
    p.add_argument("--name", default=None, help="dataset name (default: the kind)")
    p.add_argument("--behaviors", default=None,
                   help="behaviours to keep: pv,buy,cart,fav (tianchi), click,collect,cart,buy or 1..4 (alibaba), "
                        "or all; default pv / click")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="drop exact duplicate raw rows, keeping the first (default on)")
    p.add_argument("--k-core", type=int, default=0, help="keep the K-core of users and items (default 0: off)")
    p.add_argument("--start", default=None, help="window start: unix seconds or YYYY-MM-DD[ HH[:MM[:SS]]] (UTC+8)")
    p.add_argument("--end", default=None, help="window end, inclusive (a date means its last second)")
    p.add_argument("--sample-users", default=None, metavar="FRACTION",
                   help="keep the users whose SplitMix64 hash of the id is below FRACTION of 2**64: a deterministic "
                        "subset, the same whatever the file order or machine (0 < FRACTION <= 1; default: all users)")
    p.add_argument("--max-bad-rows", type=int, default=DEFAULT_MAX_BAD_ROWS,
                   help=f"bad rows to skip before stopping (default {DEFAULT_MAX_BAD_ROWS})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: on a terminal or for inputs > 256 MB)")
    p.add_argument("--workers", type=int, default=2, help="parser threads (default 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except BrokenPipeError:  # --help into a closed pipe
        _to_devnull(sys.stdout)
        return 0
    try:
        pipeline = recbole_popprior.conversion  # the lazy import: numpy, pyarrow and polars load now
        summary = pipeline.convert(args.kind, args.input, args.output, name=args.name, behaviors=args.behaviors,
                          dedup=args.dedup, k_core=args.k_core, start=args.start, end=args.end,
                          sample_users=args.sample_users, max_bad_rows=args.max_bad_rows, progress=args.progress,
                          workers=args.workers)
    except PopPriorError as exc:
        _say(sys.stderr, f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:  # ConversionInterrupted says what was left on disk
        # a Ctrl-C during the lazy import above arrives before ``pipeline`` is bound
        interrupted = sys.modules.get("recbole_popprior.converters.pipeline")
        known = interrupted is not None and isinstance(exc, interrupted.ConversionInterrupted)
        why = str(exc) if known else "interrupted; no output written"
        _say(sys.stderr, f"error: {why}")
        return 130
    _say(sys.stdout, pipeline.format_summary(summary))
    return 0


def _say(stream: TextIO, text: str) -> None:
    """Print one message; a reader that has gone away (``| head -0``) is not an error."""
    try:
        print(text, file=stream, flush=True)
    except OSError:  # EPIPE, or ENOSPC on 2>/dev/full: nowhere left to say it
        _to_devnull(stream)


def _to_devnull(stream: TextIO) -> None:
    """Python would fail again when it flushes the stream at exit (a warning and status 120),
    so the stream's descriptor is pointed at /dev/null."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
