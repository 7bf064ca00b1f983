"""recbole-popprior: separate the popularity prior from RecBole's softmax recommenders, and measure it.

Importing the package itself is light (no torch, no RecBole), so that the command lines parse
their arguments and print ``--help`` before anything heavy loads. The public functions below,
and the command lines' heavy modules (``commands``, ``conversion``), load on first use: this
module's ``__getattr__`` (PEP 562) is the package's one lazy import point, and
``tests/test_package.py`` checks that it stays the only one. It sets OpenMP's wait policy first,
while torch is not loaded yet (:mod:`recbole_popprior.openmp`).

Every module that runs RecBole code imports :mod:`recbole_popprior.compat` (which applies
RecBole 1.2.1's compatibility shims when it is imported) and the evaluator registers the energy
metrics in RecBole's registry when it is imported; the config module imports both, so
``metrics: [..., PopEnergy]`` works in any config the plugin builds (also in spawned workers).
"""

import importlib
from typing import Any

from recbole_popprior.errors import PopPriorError
from recbole_popprior.openmp import set_wait_policy as _set_wait_policy

_set_wait_policy()  # before torch is imported: libgomp reads it once (recbole_popprior/openmp.py)

__version__ = "0.2.0"

#: public function -> the module that defines it, imported on first access
_LAZY = {
    "estimate_log_prior": "recbole_popprior.prior",
    "get_model": "recbole_popprior.model",
    "register_model": "recbole_popprior.model",
    "supported_models": "recbole_popprior.model",
    "run_recbole_popprior": "recbole_popprior.quick_start",
    "popularity_energy": "recbole_popprior.evaluator",
}

#: the heavy halves of the command lines, which load after parsing: name -> the module itself
_LAZY_MODULES = {
    "commands": "recbole_popprior.commands",  # torch and RecBole, for :mod:`recbole_popprior.cli`
    # numpy, pyarrow and polars, for :mod:`recbole_popprior.converters.cli`
    "conversion": "recbole_popprior.converters.pipeline",
}


def __getattr__(name: str) -> Any:
    """Load a public function's module, or one of the command lines' heavy modules, on first access.

    ``recbole_popprior.get_model`` is the function of that name in :mod:`recbole_popprior.model`;
    ``recbole_popprior.commands`` and ``recbole_popprior.conversion`` are modules (``_LAZY_MODULES``).
    """
    if name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'recbole_popprior' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__all__ = ["PopPriorError", "estimate_log_prior", "get_model", "register_model", "supported_models",
           "run_recbole_popprior", "popularity_energy", "__version__"]
