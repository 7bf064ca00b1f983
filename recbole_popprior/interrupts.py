"""SIGTERM while a command line runs is handled as Ctrl-C is (issue 19, interrupts).

Python dies at once on SIGTERM (a scheduler's stop, ``kill``), with no clean-up at all: a
comparison left its staging folder, the tuner wrote no report, DDP workers were orphaned. While a
command's ``main()`` runs, :func:`sigterm_as_interrupt` makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, so every Ctrl-C path runs (status 143). Standard library only: the command
line imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM: the tuner writes its report, a comparison removes its staging folder and DDP
    workers are stopped, as for Ctrl-C; status 143."""


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
