"""recbole-popprior: separate the popularity prior from RecBole's softmax recommenders, and measure it.

Importing the package applies RecBole 1.2.1's compatibility shims (:mod:`recbole_popprior.compat`)
and registers the energy metrics in RecBole's metric registry, so ``metrics: [..., PopEnergy]``
works in any config built afterwards (also in spawned workers, which import the plugin).
"""

from recbole_popprior import compat as _compat

_compat.apply()

from recbole_popprior.errors import PopPriorError  # noqa: E402
from recbole_popprior.evaluator import popularity_energy  # noqa: E402  (importing it registers the metrics)
from recbole_popprior.model import get_model, register_model, supported_models  # noqa: E402
from recbole_popprior.prior import estimate_log_prior  # noqa: E402
from recbole_popprior.quick_start import run_recbole_popprior  # noqa: E402

__version__ = "0.2.0"

__all__ = ["PopPriorError", "estimate_log_prior", "get_model", "register_model", "supported_models",
           "run_recbole_popprior", "popularity_energy", "__version__"]
