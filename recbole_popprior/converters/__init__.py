"""Raw Tianchi / Alibaba logs to RecBole atomic files (docs/DESIGN.md §5).

- :mod:`~recbole_popprior.converters.read`: pass 1, stream and validate the raw log in blocks;
- :mod:`~recbole_popprior.converters.sample`: the deterministic user subset (``--sample-users``);
- :mod:`~recbole_popprior.converters.buckets`: spill, sort, dedup, k-core and write;
- :mod:`~recbole_popprior.converters.commit`: the ``.inter`` + summary pair, committed as one;
- :mod:`~recbole_popprior.converters.pipeline`: :func:`convert`, the two passes end to end;
- :mod:`~recbole_popprior.converters.cli`: ``python -m recbole_popprior.convert``.
"""

from recbole_popprior.converters.commit import verify_output
from recbole_popprior.converters.pipeline import DEFAULT_MAX_BAD_ROWS, KINDS, convert, format_summary

__all__ = ["convert", "format_summary", "verify_output", "KINDS", "DEFAULT_MAX_BAD_ROWS"]
