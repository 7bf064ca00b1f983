"""RecBole's interaction-count filter (k-core and intervals) on integer codes (DESIGN.md §5.1).

``Dataset._filter_by_inter_num`` counts tokens with ``Counter`` over Python strings and drops
rows with pandas ``isin``, once per round, until a round bans nothing. This is the same
iteration on ``bincount`` arrays: every round bans exactly the ids RecBole's round bans.

RecBole's rules, reproduced: an id is banned when it still has interactions and its count is
outside the intervals, or (with a ``.user`` / ``.item`` feature table) when it is in that table
and its count is below the first interval's left end; an empty or unparsable interval list bans
nothing; banned feature rows are dropped from their table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Intervals = list[tuple[str, float, float, str]]


def filter_by_inter_num(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                        user_intervals: Intervals | None, item_intervals: Intervals | None,
                        within: Callable, user_feat: np.ndarray | None = None,
                        item_feat: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows (and feature-table rows) that RecBole's ``_filter_by_inter_num`` keeps.

    Args:
        users, items: per-row codes in ``[0, n_users)`` / ``[0, n_items)``.
        user_intervals, item_intervals: parsed intervals (``Dataset._parse_intervals_str``).
        within: RecBole's ``Dataset._within_intervals`` (it works on count arrays).
        user_feat, item_feat: code of each feature-table row (``-1``: a token no row has).

    Returns:
        ``(rows kept, user-table rows kept, item-table rows kept)`` as boolean masks.
    """
    alive = np.ones(len(users), dtype=bool)
    user_keep = None if user_feat is None else np.ones(len(user_feat), dtype=bool)
    item_keep = None if item_feat is None else np.ones(len(item_feat), dtype=bool)
    if not user_intervals and not item_intervals:
        return alive, user_keep, item_keep
    # RecBole keeps no counter for a side without intervals: nothing on that side is banned
    user_counts = np.bincount(users, minlength=n_users) if user_intervals else None
    item_counts = np.bincount(items, minlength=n_items) if item_intervals else None
    while True:
        ban_users, feat_ban_u = _bans(user_counts, n_users, user_intervals, within, user_feat, user_keep)
        ban_items, feat_ban_i = _bans(item_counts, n_items, item_intervals, within, item_feat, item_keep)
        if not (ban_users.any() or ban_items.any() or feat_ban_u.any() or feat_ban_i.any()):
            return alive, user_keep, item_keep
        if user_keep is not None:
            user_keep &= ~feat_ban_u
        if item_keep is not None:
            item_keep &= ~feat_ban_i
        dropped = alive & (ban_users[users] | ban_items[items])
        if user_counts is not None:
            user_counts -= np.bincount(users[dropped], minlength=n_users)
        if item_counts is not None:
            item_counts -= np.bincount(items[dropped], minlength=n_items)
        alive &= ~dropped


def _bans(counts: np.ndarray | None, n: int, intervals: Intervals | None, within: Callable,
          feat: np.ndarray | None, feat_keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Banned codes, and banned (still kept) feature-table rows, for one round."""
    feat_ban = np.zeros(0 if feat is None else len(feat), dtype=bool)
    if not intervals:
        return np.zeros(n, dtype=bool), feat_ban
    ban = (counts > 0) & ~np.asarray(within(counts, intervals), dtype=bool)
    if feat is not None:
        min_num = intervals[0][1]
        count_of_row = np.where(feat >= 0, counts[np.maximum(feat, 0)], 0)
        feat_ban = feat_keep & ((count_of_row < min_num) | ((feat >= 0) & ban[np.maximum(feat, 0)]))
        ban[feat[feat_ban & (feat >= 0)]] = True
    return ban, feat_ban
