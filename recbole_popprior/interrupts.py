"""Ctrl-C while a command line starts: one line and status 130 (issue 19, 10).

Importing torch, RecBole and the plugin takes seconds, and Ctrl-C in them printed Python's
34-line ``KeyboardInterrupt`` traceback: the commands' own handlers (``error: interrupted``, the
tuner's report of what finished) only run once ``main()`` does. So the package, when it is
imported by a command line's main process (``run_recbole_popprior.py``, ``recbole-popprior``,
``python -m recbole_popprior...``), first makes SIGINT print ``error: interrupted`` and exit 130
(nothing has been written yet), and ``main()`` puts Python's ``KeyboardInterrupt`` back.
Libraries that import the plugin, and its spawned workers, are left alone. Standard library only:
this runs before anything heavy is imported. While ``main()`` runs, SIGTERM is handled as
Ctrl-C is (:func:`sigterm_as_interrupt`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from typing import Iterator

#: ``sys.argv[0]`` of the command lines while the package is imported (``-m`` for ``python -m``)
COMMANDS = ("run_recbole_popprior.py", "recbole-popprior", "-m")


def _quit(signum: int, frame: object) -> None:
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def quiet_while_starting() -> None:
    """In a command line's main process, Ctrl-C exits at once with one line, until :func:`started`."""
    argv = getattr(sys, "argv", None) or [""]
    if (os.path.basename(argv[0]) not in COMMANDS or threading.current_thread() is not threading.main_thread()
            or multiprocessing.current_process().name != "MainProcess"):
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _quit)


def started() -> None:
    """``main()`` runs: Ctrl-C raises ``KeyboardInterrupt`` again (the command says what it kept)."""
    if signal.getsignal(signal.SIGINT) is _quit:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop): handled as Ctrl-C is, so the tuner writes its
    report, a comparison removes its staging folder and DDP workers are stopped; status 143."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command's ``main()`` runs (main thread only): SIGTERM raises :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
