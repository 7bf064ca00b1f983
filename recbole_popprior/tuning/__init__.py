"""Optuna tuning of the prior weights across the model zoo (docs/DESIGN.md §1).

- :mod:`~recbole_popprior.tuning.space`: the search space (tau, alpha, plus a yaml file);
- :mod:`~recbole_popprior.tuning.storage`: SQLite / journal / PostgreSQL storage URLs;
- :mod:`~recbole_popprior.tuning.objective`: one trial = one training + a free beta sweep;
- :mod:`~recbole_popprior.tuning.report`: the table across models and Optuna's plots;
- :mod:`~recbole_popprior.tuning.runner`: :func:`run_tuning`, what ``--tune`` calls.
"""

from recbole_popprior.tuning.objective import beta_grid, choose_beta
from recbole_popprior.tuning.runner import make_plan, parse_models, run_tuning
from recbole_popprior.tuning.space import load_search_space
from recbole_popprior.tuning.storage import default_storage, make_storage

__all__ = ["run_tuning", "make_plan", "parse_models", "load_search_space", "default_storage",
           "make_storage", "choose_beta", "beta_grid"]
