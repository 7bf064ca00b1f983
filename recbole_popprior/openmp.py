"""OpenMP's wait policy, chosen before torch loads its OpenMP runtime (docs/DESIGN.md §11.1).

torch's CPU kernels run in OpenMP parallel regions (libgomp). Between regions, libgomp's idle
threads spin by default, waiting for the next one. When the machine has more runnable threads
than cores (other processes, RecBole's loader workers, other ranks), a spinning thread takes the
core that the thread doing the work needs, and each of the step's hundreds of parallel regions
waits for a time slice: on this project's shared 2-core machine a SASRec step took 1.7x longer
than with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once; the numbers are the same).
libgomp reads the variable once, when torch is first imported, so :func:`set_wait_policy` runs
first thing in the package's ``__init__`` and changes nothing when torch came first or when the
user chose a policy (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``). This module
imports nothing that imports torch.
"""

from __future__ import annotations

import os
import sys
from typing import Container, MutableMapping

_USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def set_wait_policy(environ: MutableMapping[str, str] | None = None, modules: Container[str] | None = None
                    ) -> str | None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless torch is already loaded (``modules``: ``sys.modules``) or the
    user chose; returns what it set."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or any(name in environ for name in _USER_CHOICES):
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


__all__ = ["set_wait_policy"]
