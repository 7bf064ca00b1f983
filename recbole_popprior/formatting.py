"""How the reports print numbers: three significant figures, integers as integers, p-values
with two (a leaf module: the comparison, the beta sweep and the tuning summary share it)."""

from __future__ import annotations

import math
from typing import Any, Sequence

#: significant figures of every reported measure
FIGURES = 3


def _finite_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt(value: Any, figures: int = FIGURES, *, sign: bool = False) -> str:
    """``value`` with ``figures`` significant figures (trailing zeros kept, so a column reads
    evenly); integers, and integral floats below 10^5 such as a count of 943.0, as integers;
    scientific notation below 0.001 and from 10^5 on; ``n/a`` for None and non-finite values."""
    if isinstance(value, str):
        return value
    x = _finite_float(value)
    if x is None:
        return "n/a"
    plus = "+" if sign and x > 0 else ""
    if x == 0:
        return "0"
    if isinstance(value, int) or (float(x).is_integer() and 1 <= abs(x) < 1e5):
        return f"{plus}{int(x)}"
    rounded = float(f"{x:.{figures - 1}e}")  # rounding first: 0.09996 is 0.100, not 0.1000
    magnitude = math.floor(math.log10(abs(rounded)))
    if magnitude < -3 or magnitude >= 5:
        mantissa, _, exponent = f"{x:.{figures - 1}e}".partition("e")
        return f"{plus}{mantissa}e{int(exponent)}"
    return f"{plus}{rounded:.{max(figures - 1 - magnitude, 0)}f}"


def fmt_p(p: Any) -> str:
    """A p-value with two significant figures (``3.5e-8``, ``0.026``, ``1``)."""
    x = _finite_float(p)
    if x is None:
        return "n/a"
    return fmt(x, 2)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """GitHub Markdown lines of a table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


__all__ = ["fmt", "fmt_p", "markdown_table", "FIGURES"]
