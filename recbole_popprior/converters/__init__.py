"""Raw Tianchi / Alibaba logs to RecBole atomic files (docs/DESIGN.md §5).

- :mod:`~recbole_popprior.converters.layouts`: each raw log's layout and the command line's constants
  (the standard library only);
- :mod:`~recbole_popprior.converters.read`: pass 1, stream and validate the raw log in blocks;
- :mod:`~recbole_popprior.converters.sample`: the deterministic user subset (``--sample-users``);
- :mod:`~recbole_popprior.converters.buckets`: spill, sort, dedup, k-core and write;
- :mod:`~recbole_popprior.converters.commit`: the ``.inter`` + summary pair, committed as one
  (:func:`~recbole_popprior.converters.commit.verify_output`);
- :mod:`~recbole_popprior.converters.pipeline`: :func:`~recbole_popprior.converters.pipeline.convert`,
  the two passes end to end;
- :mod:`~recbole_popprior.converters.cli`: ``python -m recbole_popprior.convert``.

This package imports nothing itself, so that the command line parses its arguments and prints
``--help`` before numpy, pyarrow and polars load: import the function from its module
(``from recbole_popprior.converters.pipeline import convert``).
"""
