"""A deterministic user subset for the converters (``--sample-users``, DESIGN.md §5).

A user is kept iff ``user_hash(user_id) < floor(fraction * 2**64)``, where ``user_hash`` is
SplitMix64's output function (Steele, Lea and Flood, 2014; Vigna's ``splitmix64.c``) applied
to the integer id as its state:

    z = id + 0x9E3779B97F4A7C15                 (all arithmetic modulo 2**64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    user_hash(id) = z ^ (z >> 31)

so ``user_hash(0)`` is SplitMix64's first output for seed 0, ``0xE220A8397B1DCDAF``. The
choice depends on the id alone: the same users are kept whatever the file order, the block
size, the number of threads or the machine, and the subsets are nested (every user kept at
fraction ``f`` is kept at any larger fraction). The mix is a bijection of 64-bit words with
good avalanche, so consecutive ids are kept independently, each with probability ``fraction``.
"""

from __future__ import annotations

import math

import numpy as np

from recbole_popprior.errors import PopPriorError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

__all__ = ["check_fraction", "user_hash", "keep_users"]


def check_fraction(fraction: object) -> float | None:
    """``None`` (keep everyone) or a finite fraction in (0, 1]; else a one-line error."""
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating, str)):
        raise PopPriorError(f"--sample-users must be a fraction in (0, 1], got {fraction!r}")
    try:
        value = float(fraction)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise PopPriorError(f"--sample-users must be a fraction in (0, 1], got {fraction!r}")
    return value


def user_hash(user: np.ndarray) -> np.ndarray:
    """SplitMix64 of non-negative int64 ids, as uint64 (see the module docstring)."""
    z = np.asarray(user, dtype=np.int64).view(np.uint64) + _GAMMA  # ids are >= 0: the view is the value
    z ^= z >> np.uint64(30)
    z *= _MUL1
    z ^= z >> np.uint64(27)
    z *= _MUL2
    z ^= z >> np.uint64(31)
    return z


def keep_users(user: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the rows whose user is in the ``fraction`` subset."""
    if fraction >= 1.0:
        return np.ones(len(user), bool)
    # fraction * 2**64 is exact in binary floating point, and below 2**64 for fraction < 1
    return user_hash(user) < np.uint64(int(fraction * 2.0**64))
