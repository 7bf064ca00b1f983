"""Command line of the raw-log converters (docs/DESIGN.md §5, :mod:`recbole_popprior.converters`).

    python -m recbole_popprior.convert {tianchi,alibaba} --input FILE --output DIR [--name NAME]
        [--behaviors pv,cart,...] [--dedup/--no-dedup] [--k-core K] [--start T --end T]
        [--max-bad-rows N] [--no-progress]

Writes DIR/NAME/NAME.inter and DIR/NAME/NAME.summary.json. Bad input ends with one
``error:`` line and exit status 2; an interrupted run leaves no output and exits 130.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from recbole_popprior.converters.pipeline import (DEFAULT_MAX_BAD_ROWS, KINDS, ConversionInterrupted, convert,
                                              format_summary)
from recbole_popprior.errors import PopPriorError

__all__ = ["convert", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every plugin CLI
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m recbole_popprior.convert",
                description="Convert the Tianchi UserBehavior or Alibaba mobile log into RecBole atomic files.")
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
    p.add_argument("--max-bad-rows", type=int, default=DEFAULT_MAX_BAD_ROWS,
                   help=f"bad rows to skip before stopping (default {DEFAULT_MAX_BAD_ROWS})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: on a terminal or for inputs > 256 MB)")
    p.add_argument("--workers", type=int, default=2, help="parser threads (default 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = convert(args.kind, args.input, args.output, name=args.name, behaviors=args.behaviors,
                          dedup=args.dedup, k_core=args.k_core, start=args.start, end=args.end,
                          max_bad_rows=args.max_bad_rows, progress=args.progress, workers=args.workers)
    except PopPriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        why = str(exc) if isinstance(exc, ConversionInterrupted) else "interrupted"
        print(f"error: {why}; no output written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
