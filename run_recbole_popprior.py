"""Train and test a prior-separated RecBole model (or compare, sweep, tune): see ``--help``.

    python run_recbole_popprior.py --model=SASRec --dataset=ml-100k
"""

import sys

try:
    from recbole_popprior.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and RecBole import (the package makes it one line, too)
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
