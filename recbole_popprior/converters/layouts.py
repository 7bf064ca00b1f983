"""What the converters read: each raw log's layout, and the command line's constants (docs/DESIGN.md §5).

The standard library only: the converter's command line builds its parser and ``--help`` (with
:func:`input_layouts`) from these tables before numpy, pyarrow or polars load, and the reader
(:mod:`~recbole_popprior.converters.read`) and the pipeline import them from here, their one home.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

__all__ = ["KINDS", "DEFAULT_MAX_BAD_ROWS", "UTC8", "UTC8_OFFSET_S", "TIANCHI_WINDOW", "TIANCHI_COLUMNS",
           "ALIBABA_COLUMNS", "BEHAVIORS", "DEFAULT_BEHAVIORS", "input_layouts"]

#: The raw logs the converters read (the command line's first argument).
KINDS = ("tianchi", "alibaba")
DEFAULT_MAX_BAD_ROWS = 1000

#: China standard time, in which both logs are stamped.
UTC8 = timezone(timedelta(hours=8))
UTC8_OFFSET_S = 8 * 3600

#: Official Tianchi UserBehavior window, 2017-11-25 00:00:00 to 2017-12-03 23:59:59 UTC+8.
TIANCHI_WINDOW = (1511539200, 1512316799)

TIANCHI_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
ALIBABA_COLUMNS = ["user_id", "item_id", "behavior_type", "user_geohash", "item_category", "time"]

#: Behaviour codes per kind (code -> name); the code is what the converters store.
BEHAVIORS = {
    "tianchi": {1: "pv", 2: "buy", 3: "cart", 4: "fav"},
    "alibaba": {1: "click", 2: "collect", 3: "cart", 4: "buy"},
}
DEFAULT_BEHAVIORS = {"tianchi": ("pv",), "alibaba": ("click",)}


def input_layouts() -> str:
    """The raw layout each ``kind`` reads (columns, header, time format), from the tables above."""
    codes = ", ".join(f"{code}={name}" for code, name in BEHAVIORS["alibaba"].items())
    start, end = (datetime.fromtimestamp(t, UTC8).strftime("%Y-%m-%d %H:%M:%S") for t in TIANCHI_WINDOW)
    return "\n".join([
        "input layouts (comma separated; .csv, .csv.gz or a single-member .zip):",
        "  tianchi  UserBehavior.csv (Tianchi dataset 649), NO header line; columns",
        f"           {','.join(TIANCHI_COLUMNS)}",
        f"           behavior_type as a word ({', '.join(BEHAVIORS['tianchi'].values())}); timestamp in unix seconds;",
        f"           default window {start} .. {end} (UTC+8), the official one; default --behaviors "
        f"{','.join(DEFAULT_BEHAVIORS['tianchi'])}",
        "  alibaba  tianchi_mobile_recommend_train_user.csv (Tianchi 2015), WITH the header line",
        f"           {','.join(ALIBABA_COLUMNS)}",
        f"           behavior_type as a code ({codes}); user_geohash may be empty;",
        "           time as 'YYYY-MM-DD HH' (e.g. 2014-12-01 10) in UTC+8; no default window; default --behaviors "
        f"{','.join(DEFAULT_BEHAVIORS['alibaba'])}",
        "  ids are non-negative decimal integers (007 and 7 are one id); --start/--end take unix seconds or",
        "  YYYY-MM-DD[ HH[:MM[:SS]]] in UTC+8 for either kind.",
        "",
        "output: OUTPUT/NAME/NAME.inter (tab separated, header user_id:token item_id:token timestamp:float",
        "behavior_type:token category_id:token; rows by user, then time) and NAME.summary.json (counts per",
        "drop reason, the .inter's size and SHA-256), committed as one pair.",
    ])
