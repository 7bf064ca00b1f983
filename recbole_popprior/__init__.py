"""recbole-popprior: separate the popularity prior from RecBole's softmax recommenders, and measure it.

Importing the package itself is light (no torch, no RecBole), so that the command lines parse
their arguments and print ``--help`` before anything heavy loads. The public functions below
load their module on first use: this module's ``__getattr__`` (PEP 562) is the package's one
lazy import point, and ``tests/test_package.py`` checks that it stays the only one.

Every module that runs RecBole code imports :mod:`recbole_popprior.compat` (which applies
RecBole 1.2.1's compatibility shims when it is imported) and the evaluator registers the energy
metrics in RecBole's registry when it is imported; the config module imports both, so
``metrics: [..., PopEnergy]`` works in any config the plugin builds (also in spawned workers).
"""

import importlib
from typing import Any

from recbole_popprior.errors import PopPriorError

__version__ = "0.2.0"

#: public name -> the module that defines it, imported on first access
_LAZY = {
    "estimate_log_prior": "recbole_popprior.prior",
    "get_model": "recbole_popprior.model",
    "register_model": "recbole_popprior.model",
    "supported_models": "recbole_popprior.model",
    "run_recbole_popprior": "recbole_popprior.quick_start",
    "popularity_energy": "recbole_popprior.evaluator",
    # the heavy half of the command line (:mod:`recbole_popprior.cli` loads it after parsing)
    "commands": "recbole_popprior.commands",
}


def __getattr__(name: str) -> Any:
    """Load a public function's module (or the ``commands`` module) on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module 'recbole_popprior' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["PopPriorError", "estimate_log_prior", "get_model", "register_model", "supported_models",
           "run_recbole_popprior", "popularity_energy", "__version__"]
