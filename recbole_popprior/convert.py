"""``python -m recbole_popprior.convert``: the converters' command line (see
:mod:`recbole_popprior.converters.cli`)."""

import sys

from recbole_popprior.converters.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
