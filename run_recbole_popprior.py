"""Train and test a prior-separated RecBole model (or compare, sweep, tune): see ``--help``.

    python run_recbole_popprior.py --model=SASRec --dataset=ml-100k
"""

import sys

from recbole_popprior.cli import main

if __name__ == "__main__":
    sys.exit(main())
