"""Process settings that make training faster without changing a single number (docs/DESIGN.md §11.1).

Two things, applied by :func:`apply_runtime` when a run starts (``build_pipeline``):

- **The allocator.** glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (dynamic,
  at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``. A SASRec step at the headline
  shape allocates and frees dozens of 26-105 MB activations, so each one is faulted in again, page
  by page (a quarter of the step was system time). :func:`tune_allocator` raises the mmap threshold
  to 256 MB and the trim threshold to 2 GB with ``mallopt`` (through ``ctypes``; glibc only, a no-op
  elsewhere), so freed blocks stay in the heap and are reused. Memory is then returned to the system less eagerly: the trainer
  gives it back between training and evaluation (:func:`release_free_memory`), and the peak RSS is
  measured beside the speed (``benchmarks/bench_epoch.py``). A user's own glibc tunables
  (``GLIBC_TUNABLES``, ``MALLOC_*_`` variables) or a preloaded allocator are left alone.
- **Threads.** :func:`configure_threads`: ``torch_threads`` when set. Otherwise torch keeps what
  ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` asked for, or what the program itself set with
  ``torch.set_num_threads`` after importing the plugin; else the count is lowered (never raised) to
  the CPUs this process may run on (``os.sched_getaffinity``) less RecBole's data-loader workers
  (``worker``), so that the loader processes do not compete with the step's threads. Inter-op
  threads are set to 1: RecBole never forks inter-op work, so more would only be idle threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from logging import getLogger
from typing import Any, Mapping

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks below this size come from the heap and are reused: every activation of the headline training
#: step (the largest, 105 MB) and the dense item-table gradient; not evaluation's score chunks (up to
#: eval_score_budget_mb, 1 GB), which the heap would keep resident through training (measured: +1 GB peak)
MMAP_THRESHOLD = 256 * 2**20
#: free memory at the top of the heap is given back to the system only beyond this
TRIM_THRESHOLD = 2**31 - 1

_ENV_TUNABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_state: dict[str, Any] = {"allocator": None, "threads": None}
#: torch's intra-op thread count when the plugin was imported: a different count later was set by the program
_THREADS_AT_IMPORT = torch.get_num_threads()


def _glibc() -> ctypes.CDLL | None:
    """glibc, or ``None`` on another C library (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc if hasattr(libc, "mallopt") else None


def allocator_skip_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why :func:`tune_allocator` leaves malloc alone, or ``None`` when it may tune it."""
    environ = os.environ if environ is None else environ
    for name in _ENV_TUNABLES:
        if name == "GLIBC_TUNABLES" and "malloc" not in environ.get(name, ""):
            continue
        if name in environ:
            return f"{name} is set"
    if any(lib in environ.get("LD_PRELOAD", "") for lib in ("tcmalloc", "jemalloc", "mimalloc")):
        return "another allocator is preloaded"
    if _glibc() is None:
        return "not glibc"
    return None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); whether they are now raised."""
    if _state["allocator"] is not None:
        return _state["allocator"]
    done = False
    if allocator_skip_reason() is None:
        libc = _glibc()
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["allocator"] = done
    return done


def _setting(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict or RecBole's ``Config`` (which has no ``get``)."""
    return config[key] if key in config else default


def release_free_memory() -> None:
    """Give the heap's free memory back to the system (``malloc_trim``), when :func:`tune_allocator` raised
    the thresholds. The trainer calls it between training and evaluation: each phase reuses its own freed
    blocks, but the blocks one phase freed would otherwise stay resident through the next one's peak."""
    if _state["allocator"]:
        _glibc().malloc_trim(0)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def intra_op_threads(config: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                     current: int | None = None) -> int | None:
    """The intra-op thread count to set, or ``None`` to leave torch's (see the module docstring)."""
    environ = os.environ if environ is None else environ
    current = torch.get_num_threads() if current is None else current
    explicit = _setting(config, "torch_threads")
    if explicit is not None:
        return int(explicit)
    if any(environ.get(name) for name in _THREAD_ENV) or current not in (_THREADS_AT_IMPORT, _state["threads"]):
        return None
    workers = int(_setting(config, "worker") or 0)
    return min(current, max(1, usable_cpus() - workers))


def configure_threads(config: Mapping[str, Any]) -> int:
    """Set torch's intra-op (and, once, inter-op) threads; returns the intra-op count."""
    threads = intra_op_threads(config)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        _state["threads"] = threads
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only allowed before the first inter-op work; then it stays as it is
            pass
    return torch.get_num_threads()


def apply_runtime(config: Mapping[str, Any]) -> None:
    """The allocator (``malloc_tuning``) and the threads (``torch_threads``), with one debug line."""
    tuned = tune_allocator() if _setting(config, "malloc_tuning", True) else False
    threads = configure_threads(config)
    getLogger().debug(f"runtime: malloc thresholds raised={tuned}, torch threads={threads}, "
                      f"inter-op threads={torch.get_num_interop_threads()}")


__all__ = ["apply_runtime", "tune_allocator", "release_free_memory", "configure_threads", "intra_op_threads", "usable_cpus",
           "allocator_skip_reason"]
